"""Faults during a run: a broken predictor, a refused upload, a device out of memory for the slot
banks. Each run goes on with stock llama.cpp's exact output and says what happened once."""

import errno
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from edge_preattn import cli
from edge_preattn.model.engine import Engine, EngineConfig
from edge_preattn.model.layout import read_layout
from edge_preattn.model.native import EXIT_LLAMA_STOPPED, NativeApi
from edge_preattn.model.synth import write_synthetic
from edge_preattn.runtime.cache_api import LLAMA_EDGE_ERR_ALLOC, bind_cache_functions
from edge_preattn.runtime.cache_runtime import CacheRuntime, RandomRanking
from edge_preattn.runtime.options import CacheOptions
from edge_preattn.runtime.slots import SlotAllocationError, SlotBank
from edge_preattn.traces import collect

from .robustness_log import record

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
N_PREDICT = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "tiny.gguf"
    write_synthetic("tiny", path, progress=False)
    return path


def greedy(llama_lib, model, **cache) -> tuple[list[int], np.ndarray, object]:
    """Tokens and logits of a greedy run with experts in host memory; with `cache`, through the slot
    cache (`CacheOptions` fields), also its controller statistics."""
    config = EngineConfig.host_experts(model, 256)
    with Engine(llama_lib, config) as engine:
        layout = read_layout(model)
        runtime = CacheRuntime.for_layout(engine, layout, CacheOptions(**cache)) if cache else None
        try:
            logits: list[np.ndarray] = []
            tokens = [t for t, _ in engine.generate(PROMPT, N_PREDICT, on_logits=logits.append)]
        finally:
            if runtime is not None:
                runtime.close()
        return tokens, np.stack(logits), runtime and runtime.controller.stats


@pytest.fixture(scope="module")
def stock(llama_lib, tiny):
    tokens, logits, _ = greedy(llama_lib, tiny)
    return tokens, logits


class Broken:
    """A predictor that fails in one way on the layers in `layers` and ranks at random elsewhere."""

    def __init__(self, fault: str, n_expert: int, layers: tuple[int, ...]) -> None:
        self.fault, self.n_expert, self.layers = fault, n_expert, layers
        self.random = RandomRanking(n_expert)

    def scores(self, il: int, x: np.ndarray):
        if il not in self.layers:
            return self.random.scores(il, x)
        n = len(x)
        return {
            "raises": lambda: 1 / 0,
            "NaN scores": lambda: np.full((n, self.n_expert), np.nan, np.float32),
            "infinite scores": lambda: np.full((n, self.n_expert), np.inf, np.float32),
            "too few experts": lambda: np.zeros((n, self.n_expert - 1), np.float32),
            "too many rows": lambda: np.zeros((n + 1, self.n_expert), np.float32),
            "out-of-range ids instead of scores": lambda: np.full((n, 4), 10_000, np.int64),
            "None": lambda: None,
            "strings": lambda: np.full((n, self.n_expert), "x"),
        }[self.fault]()


FAULTS = [
    "raises",
    "NaN scores",
    "infinite scores",
    "too few experts",
    "too many rows",
    "out-of-range ids instead of scores",
    "None",
    "strings",
]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_broken_predictor_is_switched_off_for_its_layer_and_output_stays(
    llama_lib, tiny, stock, caplog, fault
):
    layout = read_layout(tiny)
    broken_layers = (1, 2)
    predictors = Broken(fault, layout.n_expert, broken_layers)
    with caplog.at_level(logging.WARNING, logger="edge_preattn"):
        # the routing waits for each prediction: on a loaded machine the prefetch thread could fall so
        # far behind that every prediction of a healthy layer arrives after its routing (dropped as stale)
        tokens, logits, stats = greedy(
            llama_lib, tiny, n_slots=6, mode="exact", predictors=predictors, wait_for_prefetch=True
        )
    assert tokens == stock[0] and np.array_equal(logits, stock[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == len(broken_layers), warnings  # once per switched-off layer
    assert all("prediction is off for that layer" in w for w in warnings)
    for il, counters in stats.layers.items():
        assert (counters.prefetch_issued == 0) == (il in broken_layers), il
    record("fault", f"predictor {fault} (layers 1, 2 of 4)", f"tokens = stock; warning: {warnings[0]}")


def test_a_refused_upload_leaves_the_output_unchanged(llama_lib, tiny, stock, caplog, monkeypatch):
    """The C side makes every selected expert resident itself, so uploads the controller could not
    do (a device error) cost time, never output."""
    real_predict, calls = SlotBank.predict, {"n": 0}

    def failing(self, il, ubatch, experts, max_uploads):
        calls["n"] += 1
        if calls["n"] > 20:
            raise ValueError(f"prediction {experts} for layer {il} refused (status -1)")
        return real_predict(self, il, ubatch, experts, max_uploads)

    monkeypatch.setattr(SlotBank, "predict", failing)
    layout = read_layout(tiny)
    with caplog.at_level(logging.WARNING, logger="edge_preattn"):
        tokens, logits, _ = greedy(  # waiting: every prediction reaches the (failing) upload call
            llama_lib,
            tiny,
            n_slots=6,
            mode="exact",
            predictors=RandomRanking(layout.n_expert),
            wait_for_prefetch=True,
        )
    assert tokens == stock[0] and np.array_equal(logits, stock[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings and all("refused" in w for w in warnings), warnings
    record("fault", "uploads refused after the 20th (device error)", f"tokens = stock; {warnings[0]}")


def test_a_predictor_that_never_returns_neither_stalls_nor_changes_the_run(
    llama_lib, tiny, stock, caplog, monkeypatch
):
    """The router never waits for a prediction: generation goes on at once; closing leaves the stuck
    thread behind with one warning, and what it does after that touches no freed context."""
    import threading
    import time

    from edge_preattn.runtime import controller

    monkeypatch.setattr(controller, "CLOSE_WAIT_S", 0.2)
    release = threading.Event()
    n_expert = read_layout(tiny).n_expert

    class Stuck:
        def scores(self, il, x):
            release.wait()
            return np.zeros((len(x), n_expert), np.float32)

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="edge_preattn"):
        tokens, logits, stats = greedy(llama_lib, tiny, n_slots=6, mode="exact", predictors=Stuck())
    elapsed = time.monotonic() - started
    release.set()  # the stuck call returns now, after the engine is gone: it must upload nothing
    assert tokens == stock[0] and np.array_equal(logits, stock[1])
    assert elapsed < 30
    assert stats.totals().prefetch_issued == 0 and stats.totals().backlog_dropped > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "still busy" in warnings[0], warnings
    record("fault", "a predictor that never returns", f"tokens = stock in {elapsed:.1f} s; {warnings[0]}")


@pytest.fixture
def enable_fails_above(llama_lib, monkeypatch):
    """Make the C enable report out-of-memory (LLAMA_EDGE_ERR_ALLOC) above a slot count."""
    lib = llama_lib.llama_cpp._lib
    bind_cache_functions(NativeApi(llama_lib))
    real_enable = lib.llama_edge_cache_enable
    tried: list[int] = []

    def install(limit: int) -> list[int]:
        def enable(ctx, layers, n_layers, n_slots, max_batch_tokens):
            tried.append(n_slots)
            if n_slots > limit:
                return LLAMA_EDGE_ERR_ALLOC
            return real_enable(ctx, layers, n_layers, n_slots, max_batch_tokens)

        monkeypatch.setattr(lib, "llama_edge_cache_enable", enable)
        return tried

    return install


def run_cli(capsys, caplog, tiny, *extra: str) -> tuple[str, list[str], dict]:
    stats_file = tiny.parent / "stats.json"
    stats_file.unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING, logger="edge_preattn"):
        argv = ["run", "-m", str(tiny), "-p", PROMPT, "-n", str(N_PREDICT), "--temp", "0"]
        argv += ["--stats-json", str(stats_file)]
        assert cli.main([*argv, *extra]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    return capsys.readouterr().out, warnings, json.loads(stats_file.read_text())


@pytest.mark.parametrize(("limit", "expected_slots"), [(6, 5), (3, 0)])
def test_out_of_device_memory_shrinks_the_cache_or_falls_back_to_stock(
    llama_lib, tiny, capsys, caplog, enable_fails_above, limit, expected_slots
):
    reference, warnings, _ = run_cli(capsys, caplog, tiny, "--mode", "lru", "--slots", "16")
    assert not warnings
    tried = enable_fails_above(limit)
    text, warnings, stats = run_cli(capsys, caplog, tiny, "--mode", "lru", "--slots", "16")
    assert text == reference  # the same generated text as the cache (and stock) gives
    assert tried == ([16, 10, 7, 5] if limit == 6 else [16, 10, 7, 5, 4])  # halving down to k = 4
    assert stats["slots"] == expected_slots and stats["mode"] == ("lru" if expected_slots else "off")
    assert len(warnings) == 1, warnings
    what = f"slot banks out of device memory above {limit} slots (asked 16, k = 4)"
    record("fault", what, f"ran with {expected_slots or 'stock placement'}; warning: {warnings[0]}")


def test_direct_enable_failure_is_a_one_line_user_error(llama_lib, tiny, enable_fails_above):
    """SlotBank alone (bench and library users) still says what to do."""
    enable_fails_above(0)
    config = EngineConfig.host_experts(tiny, 64)
    with Engine(llama_lib, config) as engine, pytest.raises(SlotAllocationError, match="lower --slots"):
        SlotBank(engine.api, engine.ctx, (0, 1), n_slots=8)


def disk_error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def raising(code: int):
    """A stand-in for a write function that fails as the kernel would, with errno `code`."""

    def fail(*_args, **_kwargs):
        raise disk_error(code)

    return fail


def one_line(capsys, argv: list[str], fragment: str) -> str:
    """The command exits 2 with one error line holding `fragment`, its last (above it only progress
    and the run's statistics), and no traceback."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and errors == err.strip().splitlines()[-1:] and fragment in errors[0], (code, err)
    assert "Traceback" not in err
    return errors[0].partition("error: ")[2]


def half_then_full(monkeypatch) -> None:
    """Path.write_bytes writes half its data, then the disk is full (ENOSPC)."""
    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        real(self, data[: len(data) // 2])
        raise disk_error(errno.ENOSPC)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


def test_a_full_disk_leaves_the_old_output_whole_and_says_so(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "layout.json"
    out.write_text("old")
    half_then_full(monkeypatch)
    message = one_line(capsys, ["inspect", str(tiny), "--json", str(out)], "(disk full); free some space")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["layout.json"]
    record(
        "output fault", "disk full while inspect --json replaces a file", f"{message}; old file kept whole"
    )


@pytest.mark.parametrize(
    ("code", "where"),
    [(errno.EROFS, "a read-only disk"), (errno.EACCES, "a folder without write permission")],
)
def test_a_read_only_destination_is_one_line(tiny, tmp_path, capsys, monkeypatch, code, where):
    """As root the tests cannot lose write permission: the error comes from the rename (EROFS) or from
    creating the temporary file (EACCES), as the kernel would give it."""
    if code == errno.EROFS:
        monkeypatch.setattr(pathlib.Path, "replace", raising(code))
    else:
        monkeypatch.setattr(pathlib.Path, "write_bytes", raising(code))
    argv = ["run", "-m", str(tiny), "-n", "2", "--stats-json", str(tmp_path / "stats.json")]
    message = one_line(capsys, argv, "; choose a folder you can write to")
    assert list(tmp_path.iterdir()) == []
    record("output fault", f"run --stats-json on {where}", message)


def test_a_full_disk_during_synth_leaves_nothing(tmp_path, capsys, monkeypatch):
    from edge_preattn.model import synth

    def fill(fout, plan, seed, total, progress):
        fout.write(b"\0" * 4096)
        raise disk_error(errno.ENOSPC)

    monkeypatch.setattr(synth, "_write_data", fill)
    message = one_line(capsys, ["synth", "--preset", "tiny", "-o", str(tmp_path / "t.gguf")], "(disk full)")
    assert list(tmp_path.iterdir()) == []
    record("output fault", "disk full while synth writes tensor data", f"{message}; no file left")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault-prompts") / "prompts.txt"
    path.write_text("def add(a, b):\nThe capital of France is\nimport numpy as np\nfor i in range(3):\n")
    return path


def test_a_full_disk_during_collect_keeps_finished_shards_and_the_rerun_completes(
    llama_lib, tiny, prompts, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "traces"
    argv = ["collect", str(tiny), "--prompts", str(prompts), "-o", str(out), "-n", "2", "-c", "64"]
    argv += ["--prompts-per-shard", "2"]
    real_save = collect.np.save

    def save(path, array):
        if path.parent.name == ".shard-00001.tmp" and path.name.startswith("L002"):  # mid-shard
            raise disk_error(errno.ENOSPC)
        real_save(path, array)

    monkeypatch.setattr(collect.np, "save", save)
    message = one_line(capsys, argv, "(disk full); free some space and rerun")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000"]  # no half shard
    monkeypatch.setattr(collect.np, "save", real_save)
    assert cli.main(argv) == 0
    assert [s["name"] for s in json.loads((out / "manifest.json").read_text())["shards"]] == [
        "shard-00000",
        "shard-00001",
    ]
    record("output fault", "disk full inside collect's 2nd shard", f"{message}; rerun completes")
    train_argv = ["train", str(out), "-o", str(tmp_path / "predictors"), "--epochs", "1", "--hidden", "8"]
    train_argv += ["--device", "cpu", "--val-fraction", "0.5"]
    import torch

    monkeypatch.setattr(torch, "save", raising(errno.ENOSPC))
    message = one_line(capsys, train_argv, "layer-000.pt: No space left on device (disk full)")
    assert not [p for p in (tmp_path / "predictors").rglob("*") if p.name.startswith(".")]
    record("output fault", "disk full while train saves a checkpoint", message)


# `run` in which the 3rd decode first makes ggml fail a GGML_ASSERT through its public API, on THREAD:
# what a CUDA error or a bug in llama.cpp does. FAILURES: the library and the call that asserts.
GGML_ASSERT_DURING_RUN = """
import ctypes, sys, threading
from edge_preattn import cli
from edge_preattn.model import engine, native
real_decode, calls = engine.Engine.decode, []

def fail_an_assert():
    library = ctypes.CDLL(str(native.find_library() / {library!r}))
    {call}

def decode(self, tokens, all_logits=False):
    calls.append(len(tokens))
    if len(calls) == 3:
        if {thread!r} == "main":
            fail_an_assert()
        else:
            worker = threading.Thread(target=fail_an_assert)
            worker.start()
            worker.join()
    return real_decode(self, tokens, all_logits)

engine.Engine.decode = decode
sys.argv[0] = "edge-preattn"
sys.exit(cli.main())
"""
FAILURES = {
    # a tensor of a type that does not exist
    "ggml": ("libggml-base.so", "library.ggml_new_tensor(None, 9999, 1, (ctypes.c_int64 * 1)(32))"),
    # the memory of a CUDA device that does not exist
    "cuda": ("libggml-cuda.so", "library.ggml_backend_cuda_get_device_memory(9999, None, None)"),
}


def ggml_assert_during_run(model, thread: str, failure: str) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of `run` on `model` with that failure on that thread."""
    library, call = FAILURES[failure]
    script = GGML_ASSERT_DURING_RUN.format(thread=thread, library=library, call=call)
    argv = ["run", "-m", str(model), "-p", "hello", "-n", "8", "--temp", "0", "--mode", "lru"]
    process = subprocess.run(
        [sys.executable, "-c", script, *argv], check=False, capture_output=True, text=True, timeout=120
    )
    return process.returncode, process.stderr.splitlines(), process.stdout


@pytest.mark.parametrize("thread", ["main", "worker"])
def test_a_ggml_abort_ends_the_run_in_one_line(lib_dir, tiny, thread):
    """ggml_abort printed a C++ backtrace and dumped core (SIGABRT); a CUDA error ends there too."""
    status, lines, out = ggml_assert_during_run(tiny, thread, "ggml")
    assert status == EXIT_LLAMA_STOPPED and len(lines) == 1, lines
    assert lines[0].startswith("edge-preattn: llama.cpp stopped: GGML_ASSERT(type >= 0"), lines[0]
    assert "(ggml.c:" in lines[0] and "--verbose" in lines[0]
    assert out.startswith("hello") and len(out) > len("hello")  # the tokens so far
    record("fault", f"a GGML_ASSERT in llama.cpp ({thread} thread) during run", f"{lines[0]} (exit 70)")


@pytest.mark.gpu
def test_an_abort_in_the_cuda_backend_ends_the_run_in_one_line(lib_dir, tiny):
    """The CUDA backend's asserts and CUDA errors (CUDA_CHECK, after three ERROR lines of llama.cpp's log)
    end in the same ggml_abort: here an assert inside libggml-cuda, on a worker thread."""
    status, lines, _ = ggml_assert_during_run(tiny, "worker", "cuda")
    assert status == EXIT_LLAMA_STOPPED and len(lines) == 1, lines
    assert lines[0].startswith("edge-preattn: llama.cpp stopped: GGML_ASSERT(device >= 0"), lines[0]
    assert "(ggml-cuda.cu:" in lines[0]
