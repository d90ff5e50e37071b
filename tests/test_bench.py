"""`bench` and `profile` run end to end on a tiny model with the CPU build and write well-formed
results; stock placements are sized from the header. No timing is asserted."""

import json
import shutil
import subprocess

import pytest

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.measure import bench_plan
from edge_preattn.model import build
from edge_preattn.model.layout import read_layout
from edge_preattn.model.synth import write_synthetic

GiB = 1024**3
CONFIG_KEYS = {
    "name": str,
    "kind": str,
    "decode_tok_s": dict,
    "prefill_tok_s": dict,
    "ms_per_token_p50": float,
    "ms_per_token_p95": float,
    "vram_bytes": (int, type(None)),
    "hit_rate": (float, type(None)),
    "bytes_uploaded_per_token": (float, int, type(None)),
    "stall_ms_per_token": (float, type(None)),
    "tokens_equal_stock": bool,
    "physical_limit_tok_s": (float, type(None)),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    return path


def stock_library(lib_dir):
    """The cached stock CPU build, else the patched one (its patches are inert when off): this test
    checks the harness, not the difference between the two libraries."""
    stock = build.build_dir("cpu", stock=True) / "lib"
    return stock if (stock / "libllama.so").is_file() else lib_dir


def test_bench_writes_the_results_format(lib_dir, tiny, tmp_path, capsys):
    argv = ["bench", str(tiny), "--vram-budget", "50%", "-c", "256", "-n", "4", "--rounds", "1"]
    argv += [
        "--configs",
        "exps-cpu,lru,lru+token",
        "--stock-lib",
        str(stock_library(lib_dir)),
        "-o",
        str(tmp_path),
    ]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "bench-tiny-50pct.json").read_text())
    assert {
        "model",
        "machine",
        "commit",
        "command",
        "budget_bytes",
        "bandwidth_bytes_per_s",
        "configs",
    } <= set(result)
    assert result["model"] == "tiny.gguf" and result["bandwidth_bytes_per_s"] is None
    assert result["budget_bytes"] > 0 and result["command"].startswith("edge-preattn ")
    assert [c["name"] for c in result["configs"]] == ["exps-cpu", "lru", "lru+token"]
    assert [c["kind"] for c in result["configs"]] == ["stock", "edge", "edge"]
    assert result["configs"][2]["placement"].endswith("--residency token")
    for config in result["configs"]:
        for key, kind in CONFIG_KEYS.items():
            assert isinstance(config[key], kind), (config["name"], key, config[key])
        assert set(config["decode_tok_s"]) == {"median", "min", "max"}
        assert config["tokens_equal_stock"]  # the CPU build: the cache gives stock's exact logits
    lru = result["configs"][1]
    assert 0 <= lru["hit_rate"] <= 1 and lru["physical_limit_tok_s"] > 0
    limit = lru["physical_limit"]  # the step splits into compute, bus and the rest
    parts = limit["resident_ms_per_token"] + limit["bus_ms_per_token"] + limit["other_ms_per_token"]
    assert parts == pytest.approx(lru["ms_per_token_p50"], abs=1e-3)
    table = (tmp_path / "bench-tiny-50pct.md").read_text()
    assert table.startswith("# bench: tiny.gguf") and "- where the time goes" in table
    state = next(tmp_path.glob(".bench-tiny-*.state.json"))
    runs_before = json.loads(state.read_text())["runs"]
    assert cli.main(argv) == 0  # the same command again: everything is already measured
    assert json.loads(state.read_text())["runs"] == runs_before
    capsys.readouterr()


def test_profile_writes_both_tables(llama_lib, tiny, tmp_path, capsys):
    argv = ["profile", str(tiny), "-n", "50", "--samples", "3", "-c", "256", "-o", str(tmp_path)]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "profile-tiny.json").read_text())
    ops = report["table1"]["ops"]
    n_moe = len(read_layout(tiny).moe_layers)
    for kind in (
        "pre_attn_norm",
        "self_attention",
        "post_attn_norm",
        "expert_selection",
        "expert_computation",
    ):
        assert ops[kind]["samples"] == 50 * n_moe, kind
        assert len(ops[kind]["per_layer_mean_ms"]) == n_moe
    rows = report["table5"]["rows"]
    assert (
        rows["RAM → RAM (pageable)"]["available"]
        and rows["RAM → RAM (pageable)"]["k_experts"]["samples"] == 3
    )
    assert not rows["RAM → GPU (pinned)"]["available"]  # CPU-only build
    assert report["bandwidth"]["pageable_bytes_per_s"] > 0 and not report["bandwidth"]["gpu"]
    assert "| expert selection |" in (tmp_path / "profile-tiny.md").read_text()
    capsys.readouterr()


def test_stock_placements_are_sized_to_the_budget(tmp_path):
    """On a GPU build: --n-cpu-moe takes the fewest expert layers off the GPU, -ngl the most layers on
    it, that fit; edge modes get the slots of `run --vram-budget`."""
    model = tmp_path / "q3.gguf"
    write_synthetic("qwen3-30b-a3b", model, qtype="q4_0", sparse=True, progress=False)
    layout = read_layout(model)
    budget = 10 * GiB
    runs, tables, _, reference = bench_plan.plan_runs(
        layout,
        [budget],
        [None, 16e9],
        ["n-cpu-moe", "ngl", "lru"],
        gpu=True,
        n_ctx=4096,
        has_predictors=False,
    )
    assert reference == "all-gpu" and runs[reference].estimated_vram_bytes > budget
    by_name = {runs[key].name: runs[key] for key in tables[(budget, None)]}
    assert set(by_name) == {"all-gpu", "n-cpu-moe", "ngl", "lru"}
    weights = bench_plan.weight_bytes(layout)
    n_cpu_moe, ngl = by_name["n-cpu-moe"].n_cpu_moe, by_name["ngl"].n_gpu_layers
    assert bench_plan.stock_vram_bytes(layout, weights, 4096, -1, n_cpu_moe) <= budget
    assert bench_plan.stock_vram_bytes(layout, weights, 4096, -1, n_cpu_moe - 1) > budget
    assert bench_plan.stock_vram_bytes(layout, weights, 4096, ngl, 0) <= budget
    assert bench_plan.stock_vram_bytes(layout, weights, 4096, ngl + 1, 0) > budget
    capped = [runs[key] for key in tables[(budget, 16e9)] if runs[key].kind == "edge"]
    assert capped[0].bandwidth_bytes_per_s == 16e9 and capped[0].slots == by_name["lru"].slots > 0


def test_emulate_refuses_unknown_profiles_and_conflicting_flags(tiny, tmp_path, capsys):
    base = ["bench", str(tiny), "--vram-budget", "25%", "-o", str(tmp_path)]
    assert cli.main([*base, "--emulate", "rtx9090"]) == 2
    assert "unknown --emulate profile 'rtx9090'" in capsys.readouterr().err
    assert cli.main([*base, "--emulate", "rtx4070-pcie4", "--bandwidth", "8GB/s"]) == 2
    assert "sets the threads and the bus" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_emulate_without_mps_is_one_line(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-cuda-mps-control to be found
    assert cli.main(["bench", str(tiny), "--vram-budget", "25%", "--emulate", "laptop-pcie4x8"]) == 2
    assert "--emulate needs CUDA MPS" in capsys.readouterr().err


def test_emulation_calibrates_the_memory_load_to_the_cards_bandwidth(monkeypatch, tmp_path):
    """The load's duty is bisected until the client's measured copy rate is nearest the target."""
    import contextlib

    from edge_preattn.measure import emulate

    duty_now = [0.0]

    @contextlib.contextmanager
    def load(program, env, duty):
        duty_now[0] = duty
        yield
        duty_now[0] = 0.0

    # a client that sees 2000 GB/s alone and loses 1800 GB/s under a full load, linearly
    monkeypatch.setattr(emulate, "_load", load)
    monkeypatch.setattr(emulate, "_probe", lambda program, env: (46, 2000.0 - 1800.0 * duty_now[0]))
    duty, gbps = emulate._calibrated_duty(tmp_path, {}, {}, 2000.0, 504.0)
    assert abs(duty - (2000 - 504) / 1800) <= 1 / 2**emulate.DUTY_STEPS
    assert abs(gbps - 504.0) <= 1800 / 2**emulate.DUTY_STEPS
    assert emulate._calibrated_duty(tmp_path, {}, {}, 400.0, 504.0) == (0.0, 400.0)  # slower alone: no load
    monkeypatch.setattr(emulate, "_probe", lambda program, env: (46, 2000.0 - 100.0 * duty_now[0]))
    assert emulate._calibrated_duty(tmp_path, {}, {}, 2000.0, 504.0) == (1.0, 1900.0)  # the most it can do


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the CUDA toolkit)")
def test_the_emulation_load_compiles_and_a_failed_probe_is_one_line(tmp_path, monkeypatch):
    """emulate_load.cu is built by nvcc on first use, on the GPU machine only: a compile error would show
    there first. Here it is compiled; without a usable GPU its probe fails, and says why in one line."""
    from edge_preattn.measure import emulate

    monkeypatch.setenv("EDGE_PREATTN_CACHE", str(tmp_path))
    program = emulate._load_program()
    assert program.is_file() and program.parent == tmp_path / "tools"
    assert emulate._load_program() == program  # cached by the source's hash
    if subprocess.run([str(program), "probe"], capture_output=True, check=False).returncode == 0:
        pytest.skip("a GPU answers here: the failure path cannot be seen")
    with pytest.raises(UserError, match=r"^the --emulate probe failed: emulate_load: \S+: .+$"):
        emulate._probe(program, {})
    load_failed = r"^the --emulate memory load did not start: emulate_load: \S+: .+$"
    with pytest.raises(UserError, match=load_failed), emulate._load(program, {}, 0.5):
        pass
