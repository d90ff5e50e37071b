"""`edge-preattn bench`: at the VRAM I have, which generates faster with the same tokens, stock
llama.cpp offload or the expert cache?

Every configuration runs in its own process: llama-cpp-python binds one library per process, stock
configurations need the unpatched build, and VRAM is read from the driver per process. Stock
configurations are sized to the budget from the GGUF header (the all-on-GPU run always happens: it
is the token reference and the resident-compute time); edge-preattn modes get the slots `run
--vram-budget` would. Configurations alternate in rounds so that drift hits all alike, and the
results are rewritten after every run: an interrupted bench keeps what it measured, and the same
command run again resumes where it stopped.

The physical limit of an edge configuration is, per token, the larger of the all-on-GPU step time
(every weight resident) and the bytes it uploaded divided by the measured host→device bandwidth
(capped by --bandwidth): no scheduling of uploads can beat it. Where the time goes: the measured
step split into that resident compute, the bus time (misses are queued on the compute stream, so
without prefetch the two add up), and the rest (per-layer graph splits and host work at routing).
"""

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import build, native
from .controller import MODES, PREDICTION_MODES
from .emulate import PROFILES, EdgeProfile, edge_gpu, get_profile
from .errors import UserError
from .files import write_bytes_atomic, write_json_atomic, write_text_atomic
from .layout import MoeLayout, _read_header, estimate_compute_buffer_bytes, plan_slots, read_layout
from .units import format_bytes, parse_bytes, parse_rate

log = logging.getLogger(__name__)

HELP = "stock llama.cpp offload vs the expert cache at a VRAM budget: tok/s, VRAM, cache stats, same tokens"
EXAMPLES = """\
  edge-preattn bench model.gguf --vram-budget 8GiB --predictors preds/ -o results/
  edge-preattn bench model.gguf --vram-budget 6GiB,10GiB,14GiB --bandwidth none,16GB/s --predictors preds/
  edge-preattn bench model.gguf --vram-budget 8GiB --configs exps-cpu,lru,oracle -n 16 --rounds 1
"""

STOCK_CONFIGS = ("all-gpu", "exps-cpu", "n-cpu-moe", "ngl")
# "mode+cpu" / "mode+auto": that mode with `--miss cpu|auto` (missed experts computed on the CPU)
EDGE_CONFIGS = (*MODES[1:], "lru+cpu", "exact+cpu", "oracle+cpu", "lru+auto", "exact+auto")


def edge_mode(name: str) -> tuple[str, str]:
    """(run mode, miss policy) of an edge configuration name."""
    mode, _, miss = name.partition("+")
    return mode, miss or "upload"


DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "The three primary colors are",
    "import numpy as np\n\ndef softmax(x):",
)
CAP_NOTE = (
    "--bandwidth models a slower bus in the library: every upload, prefetch or miss, takes bytes / rate "
    "on one shared bus, and a layer's expert matmuls wait until it has delivered their experts; stock "
    "configurations move no experts per token and are not capped"
)
SUMMARY_STATS = (
    "hit_rate",
    "misses_per_token",
    "bytes_uploaded_per_token",
    "stall_ms_per_token",
    "predictor_ms_per_call",
    "forced_uploads",
)


@dataclass(frozen=True)
class RunSpec:
    """One configuration as one worker process runs it; `key` names it across budgets and rounds."""

    key: str
    name: str  # one of STOCK_CONFIGS + EDGE_CONFIGS
    kind: str  # "stock" | "edge"
    placement: str  # what a reader needs to reproduce it
    estimated_vram_bytes: int
    n_gpu_layers: int = -1  # -1: all
    n_cpu_moe: int = 0  # routed experts of the first N blocks in host RAM (>= n_layer: all)
    slots: int = 0
    bandwidth_bytes_per_s: float | None = None


@dataclass(frozen=True)
class Workload:
    """What every configuration generates: same prompts, tokens, threads and context."""

    model: str
    prompts: tuple[str, ...]
    n_predict: int
    n_ctx: int
    threads: int
    predictors: str | None
    extra: int
    target: float
    bypass_tokens: int
    copy_queue: bool = False  # every cache configuration queues its prefetches on a copy stream


# --- sizing stock placements from the header ---------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    block: tuple[int, ...]  # per block: every tensor of blk.N
    block_experts: tuple[int, ...]  # per block: its routed-expert tensors
    output: int  # output norm and head: on the GPU only when every block is


def weight_bytes(layout: MoeLayout) -> WeightBytes:
    """Bytes per block from the header (token_embd stays in host RAM, as llama.cpp keeps it)."""
    tensors = {t.name: t.n_bytes for t in _read_header(layout.path).tensors}  # validated by read_layout
    block = [0] * layout.n_layer
    for name, n_bytes in tensors.items():
        if name.startswith("blk."):
            block[int(name.split(".")[1])] += n_bytes
    experts = [0] * layout.n_layer
    for layer in layout.moe_layers:
        experts[layer.index] = layer.bytes_per_expert * layer.n_expert
    output = sum(n for name, n in tensors.items() if name.startswith("output"))
    if "output.weight" not in tensors:  # tied embeddings: llama.cpp puts a copy of them on the GPU
        output += tensors.get("token_embd.weight", 0)
    return WeightBytes(tuple(block), tuple(experts), output)


def stock_vram_bytes(
    layout: MoeLayout, weights: WeightBytes, n_ctx: int, n_gpu_layers: int, n_cpu_moe: int
) -> int:
    """Planned VRAM of stock `-ngl n_gpu_layers --n-cpu-moe n_cpu_moe`: GPU blocks' weights (their
    experts only past the first n_cpu_moe blocks), their KV cache, the output head when every block is
    on the GPU, and plan_slots's compute-buffer estimate."""
    n_layer = layout.n_layer
    on_gpu = n_layer if n_gpu_layers < 0 else min(n_gpu_layers, n_layer)
    blocks = range(n_layer - on_gpu, n_layer)  # llama.cpp offloads the last blocks first
    total = sum(weights.block[i] - (weights.block_experts[i] if i < n_cpu_moe else 0) for i in blocks)
    if n_gpu_layers < 0 or n_gpu_layers > n_layer:
        total += weights.output
    total += layout.kv_cache_bytes(n_ctx) * on_gpu // n_layer
    return total + estimate_compute_buffer_bytes(layout, n_ctx)


def _stock_run(layout: MoeLayout, weights: WeightBytes, n_ctx: int, name: str, value: int = 0) -> RunSpec:
    """all-gpu, exps-cpu, n-cpu-moe=value or ngl=value as a run, with its planned VRAM."""
    n_layer = layout.n_layer
    ngl, n_cpu_moe, placement = {
        "all-gpu": (-1, 0, "every layer on the GPU"),
        "exps-cpu": (-1, n_layer, "-ot exps=CPU"),
        "n-cpu-moe": (-1, value, f"--n-cpu-moe {value}"),
        "ngl": (value, 0, f"-ngl {value}"),
    }[name]
    key = name if name in ("all-gpu", "exps-cpu") else f"{name}={value}"
    vram = stock_vram_bytes(layout, weights, n_ctx, ngl, n_cpu_moe)
    return RunSpec(key, name, "stock", placement, vram, n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe)


def _stock_runs_at(
    layout: MoeLayout, weights: WeightBytes, n_ctx: int, budget: int, names: list[str], *, notes: list[str]
) -> list[RunSpec]:
    """The stock configurations of a GPU build sized to `budget`: exps-cpu, the smallest --n-cpu-moe
    that fits and the largest -ngl that fits (none when it would be all-gpu or nothing fits)."""
    n_layer, found = layout.n_layer, []
    if "exps-cpu" in names:
        found.append(_stock_run(layout, weights, n_ctx, "exps-cpu"))
    if "n-cpu-moe" in names:
        fitting = [n for n in range(n_layer + 1) if stock_vram_bytes(layout, weights, n_ctx, -1, n) <= budget]
        if not fitting:
            notes.append("--n-cpu-moe: even every expert in RAM exceeds the budget; not run")
        elif fitting[0] == 0:
            notes.append("--n-cpu-moe 0 fits, which is all-gpu")
        else:
            found.append(_stock_run(layout, weights, n_ctx, "n-cpu-moe", fitting[0]))
    if "ngl" in names:
        fitting = [n for n in range(n_layer + 2) if stock_vram_bytes(layout, weights, n_ctx, n, 0) <= budget]
        if not fitting:
            notes.append("-ngl: not even the compute buffer fits the budget; not run")
        elif fitting[-1] > n_layer:
            notes.append("-ngl: every layer fits, which is all-gpu")
        else:
            found.append(_stock_run(layout, weights, n_ctx, "ngl", fitting[-1]))
    return found


def _edge_run(layout: MoeLayout, name: str, plan, bandwidth: float | None) -> RunSpec:
    cap = f" --bandwidth {bandwidth / 1e9:g}GB/s" if bandwidth else ""
    return RunSpec(
        f"{name}:slots={plan.slots_per_layer}" + (f":bw={bandwidth / 1e9:g}GBps" if bandwidth else ""),
        name,
        "edge",
        f"--mode {edge_mode(name)[0]} --slots {plan.slots_per_layer} --miss {edge_mode(name)[1]}{cap}",
        plan.non_expert_bytes + plan.kv_cache_bytes + plan.compute_buffer_bytes + plan.expert_cache_bytes,
        n_cpu_moe=layout.n_layer,
        slots=plan.slots_per_layer,
        bandwidth_bytes_per_s=bandwidth,
    )


def plan_runs(
    layout: MoeLayout,
    budgets: list[int],
    bandwidths: list[float | None],
    names: list[str],
    *,
    gpu: bool,
    n_ctx: int,
    has_predictors: bool,
) -> tuple[dict[str, RunSpec], dict[tuple[int, float | None], list[str]], dict[int, list[str]], str]:
    """(runs by key, keys of each (budget, bandwidth) table, notes per budget, the reference's key).

    The reference (all-gpu; exps-cpu on a CPU-only build, where the GPU placements are all the same
    one) is in every table. Runs shared by several tables appear once.
    """
    weights = weight_bytes(layout)
    reference = _stock_run(layout, weights, n_ctx, "all-gpu" if gpu else "exps-cpu")
    runs = {reference.key: reference}
    tables: dict[tuple[int, float | None], list[str]] = {}
    notes: dict[int, list[str]] = {}
    edge_names = [name for name in EDGE_CONFIGS if name in names]
    predicting = [name for name in edge_names if edge_mode(name)[0] in PREDICTION_MODES]
    skipped = [] if has_predictors else predicting
    edge_names = [name for name in edge_names if name not in skipped]
    for budget in budgets:
        said = notes.setdefault(budget, [])
        if not gpu:
            said.append(
                "CPU-only build: all-gpu, --n-cpu-moe and -ngl put every weight in host RAM like "
                "-ot exps=CPU, so the one stock configuration run is exps-cpu"
            )
            stock = []
        else:
            if reference.estimated_vram_bytes > budget:
                said.append("all-gpu does not fit: run as the token reference and marked over budget")
            stock = _stock_runs_at(layout, weights, n_ctx, budget, names, notes=said)
        if skipped:
            said.append(f"no --predictors: {', '.join(skipped)} not run")
        try:
            plan = plan_slots(layout, budget, n_ctx)
        except UserError as error:
            said.append(f"edge-preattn: {error}")
            plan = None
        for bandwidth in bandwidths:
            edge = [_edge_run(layout, name, plan, bandwidth) for name in edge_names] if plan else []
            for spec in [reference, *stock, *edge]:
                runs.setdefault(spec.key, spec)
            tables[(budget, bandwidth)] = [spec.key for spec in [reference, *stock, *edge]]
    return runs, tables, notes, reference.key


# --- the worker: one configuration, one process --------------------------------------------------------


def _merged(records):
    """One Generation over every prompt: run_stats then reads the whole workload."""
    from .engine import Generation

    return Generation(
        prompt_tokens=[t for r in records for t in r.prompt_tokens],
        tokens=[t for r in records for t in r.tokens],
        prefill_seconds=sum(r.prefill_seconds for r in records),
        decode_seconds=[s for r in records for s in r.decode_seconds],
    )


def record_oracle(engine, prompts: tuple[str, ...], n_predict: int, sampling) -> dict:
    """The routing of every prompt in turn, ubatches numbered as one runtime will count them."""
    from .controller import record_routing

    merged, offset = {}, 0
    for prompt in prompts:
        routing = record_routing(engine, prompt, n_predict, sampling)
        merged.update({(ubatch + offset, il): ids for (ubatch, il), ids in routing.items()})
        offset += 1 + max((ubatch for ubatch, _ in routing), default=-1)
    return merged


def run_config(spec: RunSpec, work: Workload) -> dict:
    """Generate the workload in this process with the library EDGE_PREATTN_LIB names."""
    from .controller import CacheRuntime
    from .engine import Engine, EngineConfig, Sampling, complete, expert_overrides
    from .machine import VramProbe
    from .run import run_stats

    probe = VramProbe.start()
    # (with misses on the CPU, the CPU side's expert matmuls must stay on the CPU)
    offload = spec.kind == "edge" and edge_mode(spec.name)[1] == "upload"
    llama_cpp = native.load_llama(native.find_library(), offload_short_batches=offload)
    layout = read_layout(work.model)
    if spec.n_cpu_moe >= layout.n_layer:
        overrides = expert_overrides(None)
    else:
        overrides = expert_overrides(spec.n_cpu_moe) if spec.n_cpu_moe else ()
    config = EngineConfig(
        work.model,
        n_ctx=work.n_ctx,
        n_threads=work.threads,
        n_gpu_layers=spec.n_gpu_layers,
        overrides=overrides,
        use_extra_bufts=spec.kind == "stock",  # the cache reads experts as the file's plain bytes
    )
    sampling = Sampling(temperature=0.0)  # greedy: every configuration must give stock's tokens
    started = time.perf_counter()
    with Engine(llama_cpp, config) as engine, contextlib.ExitStack() as stack:
        load_s = time.perf_counter() - started
        complete(engine, work.prompts[0], min(4, work.n_predict), sampling)  # warm-up
        runtime = None
        if spec.kind == "edge":
            predictors = None
            mode, miss = edge_mode(spec.name)
            if mode in PREDICTION_MODES:
                from .onnx_io import load_predictor_set

                predictors = load_predictor_set(Path(work.predictors), fingerprint=layout.routing_fingerprint)
            oracle = (
                record_oracle(engine, work.prompts, work.n_predict, sampling) if mode == "oracle" else None
            )
            runtime = stack.enter_context(
                CacheRuntime.for_layout(
                    engine,
                    layout,
                    n_slots=spec.slots,
                    mode=mode,
                    miss=miss,
                    max_batch_tokens=work.bypass_tokens,
                    predictors=predictors,
                    extra=work.extra,
                    target=work.target,
                    bandwidth_bytes_per_s=spec.bandwidth_bytes_per_s,
                    oracle=oracle,
                    copy_queue=work.copy_queue,
                )
            )
        records = [complete(engine, prompt, work.n_predict, sampling) for prompt in work.prompts]
        merged = _merged(records)
        stats = run_stats(merged, engine, runtime)
        vram_bytes, vram_source = probe.read()
        build_info = engine.api.build_info()
    return {
        "tokens": [r.tokens for r in records],
        "decode_ms": [round(s * 1e3, 4) for s in merged.decode_seconds],
        "prefill_tok_s": merged.prefill_tok_s,
        "decode_tok_s": merged.decode_tok_s,
        "stats": stats,
        "vram_bytes": vram_bytes,
        "vram_source": vram_source,
        "load_s": round(load_s, 3),
        "build": build_info,
    }


def worker_main(argv: list[str]) -> int:
    """`python -m edge_preattn.bench JOB.json OUT.json`: what the bench runs in each subprocess."""
    job = json.loads(Path(argv[0]).read_text())
    if job["task"] == "bandwidth":
        from .profile import measure_bandwidth

        api = native.NativeApi(native.load_llama(native.find_library()))
        result = {"gpu": bool(api.gpus())}
        try:  # without it the bench still runs, only the physical limits are left out
            result.update(measure_bandwidth(api))
        except (UserError, RuntimeError, OSError, ValueError) as error:
            result["error"] = repr(error)
    else:
        result = run_config(RunSpec(**job["spec"]), Workload(**job["workload"]))
    write_json_atomic(Path(argv[1]), result)
    return 0


# --- the parent: rounds, state, summaries ----------------------------------------------------------------


def library_dirs(stock_lib: str | None) -> tuple[Path, Path]:
    """(patched, stock) library folders: the stock one beside the patched build of the same preset."""
    patched = native.find_library()
    if stock_lib:
        stock = Path(stock_lib)
    else:
        info = patched.parent / "build.json"
        if not info.is_file():
            raise UserError(
                f"{patched} is not an `edge-preattn build` folder: pass the unpatched one with --stock-lib"
            )
        preset = json.loads(info.read_text())["preset"]
        stock = build.build_dir(preset, stock=True) / "lib"
        if not (stock / "libllama.so").is_file():
            raise UserError(
                f"no stock llama.cpp build for preset {preset}: run "
                f"`edge-preattn build --preset {preset} --stock` (or pass --stock-lib DIR)"
            )
    if not (stock / "libllama.so").is_file():
        raise UserError(f"--stock-lib {stock} holds no libllama.so")
    return patched, stock


class Interrupted(Exception):
    """SIGTERM (a `timeout`, a job scheduler): stop like Ctrl-C, keeping what was measured."""


def _raise_interrupted(_signum, _frame) -> None:
    raise Interrupted


def run_worker(job: dict, lib_dir: Path, timeout_s: float, extra_env: dict[str, str] | None = None) -> dict:
    """Run one job in a fresh process; its result, or {"error": ...} when it failed.

    `extra_env`: e.g. the MPS client settings of an emulated edge GPU (every CUDA process must get them).
    """
    with tempfile.TemporaryDirectory(prefix="edge-bench-") as scratch:
        job_path, out_path = Path(scratch) / "job.json", Path(scratch) / "out.json"
        job_path.write_text(json.dumps(job))
        env = {**os.environ, **(extra_env or {}), "EDGE_PREATTN_LIB": str(lib_dir), "PYTHONUNBUFFERED": "1"}
        env.pop("LLAMA_CPP_LIB_PATH", None)
        command = [sys.executable, "-m", "edge_preattn.bench", str(job_path), str(out_path)]
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            return {
                "error": f"timed out after {timeout_s:.0f} s",
                "log_tail": output.decode(errors="replace")[-2000:],
            }
        except BaseException:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        if process.returncode != 0 or not out_path.is_file():
            tail = output.decode(errors="replace").strip().splitlines()[-12:]
            return {"error": f"exit status {process.returncode}", "log_tail": "\n".join(tail)}
        return json.loads(out_path.read_text())


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "median": round(float(np.median(values)), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 4) if values else None


def summarize(
    spec: RunSpec,
    records: list[dict],
    reference: list[dict],
    bandwidth: dict | None,
    budget: int,
) -> dict:
    """One row of the results: medians and spread over rounds, tokens vs the reference, the limit."""
    ok = [r for r in records if "error" not in r]
    row = {
        "name": spec.name,
        "kind": spec.kind,
        "placement": spec.placement,
        "run_key": spec.key,
        "rounds": len(ok),
        "decode_tok_s": _spread([r["decode_tok_s"] for r in ok]),
        "prefill_tok_s": _spread([r["prefill_tok_s"] for r in ok]),
        "ms_per_token_p50": None,
        "ms_per_token_p95": None,
        "vram_bytes": max((r["vram_bytes"] for r in ok if r["vram_bytes"] is not None), default=None),
        "vram_source": ok[0]["vram_source"] if ok else None,
        "estimated_vram_bytes": spec.estimated_vram_bytes,
        "fits_budget": spec.estimated_vram_bytes <= budget,
        "hit_rate": None,
        "bytes_uploaded_per_token": None,
        "stall_ms_per_token": None,
        "tokens_equal_stock": False,
        "physical_limit_tok_s": None,
    }
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        row["errors"] = errors
    if not ok:
        return row
    decode_ms = np.array([ms for r in ok for ms in r["decode_ms"]] or [0.0])
    row["ms_per_token_p50"] = round(float(np.percentile(decode_ms, 50)), 3)
    row["ms_per_token_p95"] = round(float(np.percentile(decode_ms, 95)), 3)
    if spec.kind == "edge":
        for key in SUMMARY_STATS:
            row[key] = _median([r["stats"].get(key) for r in ok])
        predictor_ms = row.pop("predictor_ms_per_call")
        row["predictor_ms_per_layer"] = predictor_ms if edge_mode(spec.name)[0] in PREDICTION_MODES else None
        # the ubatch where a prediction mode switched itself off (late or idle predictions), per round
        row["prediction_off_at_ubatch"] = [r["stats"].get("prediction_off_at_ubatch") for r in ok]
    reference_ok = [r for r in reference if "error" not in r]
    if reference_ok:
        row["tokens_equal_stock"] = all(r["tokens"] == reference_ok[0]["tokens"] for r in ok)
    if spec.kind == "edge" and reference_ok and bandwidth and "error" not in bandwidth:
        resident_ms = float(np.percentile([ms for r in reference_ok for ms in r["decode_ms"]], 50))
        pinned = any(r["stats"].get("pinned_bytes") for r in ok)
        bus = (
            bandwidth["pinned_bytes_per_s"]
            if pinned and bandwidth["pinned_bytes_per_s"]
            else bandwidth["pageable_bytes_per_s"]
        )
        if spec.bandwidth_bytes_per_s:
            bus = min(bus, spec.bandwidth_bytes_per_s)
        bus_ms = (row["bytes_uploaded_per_token"] or 0) / bus * 1e3
        limit_ms = max(resident_ms, bus_ms)
        row["physical_limit_tok_s"] = round(1e3 / limit_ms, 3) if limit_ms > 0 else None
        row["physical_limit"] = {
            "resident_ms_per_token": round(resident_ms, 4),
            "bus_ms_per_token": round(bus_ms, 4),
            "bus_bytes_per_s": bus,
            "bus": ("pinned" if pinned else "pageable") + (" capped" if spec.bandwidth_bytes_per_s else ""),
            "measured_over_limit": round(row["ms_per_token_p50"] / limit_ms, 3) if limit_ms > 0 else None,
            # what is left of the step once compute and a bus that never overlaps it are paid
            "other_ms_per_token": round(row["ms_per_token_p50"] - resident_ms - bus_ms, 4),
        }
    return row


def headline(rows: list[dict]) -> dict:
    """Best edge-preattn mode vs best stock configuration that fits, prediction vs lru, limit gap."""

    def best(candidates: list[dict]) -> dict | None:
        scored = [r for r in candidates if r["decode_tok_s"]]
        return max(scored, key=lambda r: r["decode_tok_s"]["median"], default=None)

    edge = best([r for r in rows if r["kind"] == "edge"])
    stock = best([r for r in rows if r["kind"] == "stock" and r["fits_budget"]])
    lru = next((r for r in rows if r["name"] == "lru" and r["decode_tok_s"]), None)
    predicted = best([r for r in rows if edge_mode(r["name"])[0] in PREDICTION_MODES])
    result = {
        "best_edge": edge and edge["name"],
        "best_stock": stock and stock["name"],
        "edge_over_stock": None,
        "best_prediction_mode": predicted and predicted["name"],
        "prediction_over_lru": None,
        "best_edge_measured_over_limit": edge
        and (edge.get("physical_limit") or {}).get("measured_over_limit"),
    }
    if edge and stock:
        result["edge_over_stock"] = round(edge["decode_tok_s"]["median"] / stock["decode_tok_s"]["median"], 3)
    if predicted and lru:
        result["prediction_over_lru"] = round(
            predicted["decode_tok_s"]["median"] / lru["decode_tok_s"]["median"], 3
        )
    return result


def _label(text: str) -> str:
    """A budget or rate as a file-name part: 8GiB, 25pct, 16GBps."""
    return text.strip().replace(" ", "").replace("%", "pct").replace("/s", "ps").replace("/", "_")


TABLE_HEADER = (
    "config",
    "placement",
    "decode tok/s (min–max)",
    "prefill tok/s",
    "ms/tok p50",
    "p95",
    "VRAM",
    "hit rate",
    "misses/tok",
    "uploaded/tok",
    "stall ms/tok",
    "pred ms/layer",
    "= stock",
    "limit tok/s",
    "measured/limit",
)


def _cells(row: dict) -> list[str]:
    def number(value, digits: int = 1) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    def size(value) -> str:
        return "–" if value is None else format_bytes(value)

    decode, prefill = row["decode_tok_s"], row["prefill_tok_s"]
    return [
        row["name"] + ("" if row["fits_budget"] else " (over budget)"),
        row["placement"],
        f"{decode['median']:.1f} ({decode['min']:.1f}–{decode['max']:.1f})" if decode else "failed",
        number(prefill and prefill["median"]),
        number(row["ms_per_token_p50"], 2),
        number(row["ms_per_token_p95"], 2),
        size(row["vram_bytes"]),
        number(row.get("hit_rate"), 3),
        number(row.get("misses_per_token"), 2),
        size(row.get("bytes_uploaded_per_token")),
        number(row.get("stall_ms_per_token"), 2),
        number(row.get("predictor_ms_per_layer"), 3),
        "yes" if row["tokens_equal_stock"] else "NO",
        number(row["physical_limit_tok_s"]),
        number((row.get("physical_limit") or {}).get("measured_over_limit"), 2),
    ]


def _emulation_lines(emulate: dict | None) -> list[str]:
    """What an emulated run stood for, and what its calibration reached (emulate.edge_gpu)."""
    if not emulate:
        return []
    measured = emulate.get("measured") or {}
    reached = (
        f": {measured['client_sms']} of {measured['device_sms']} SMs, device copy "
        f"{measured['client_copy_gbps']:.0f} GB/s (target {emulate['memory_bytes_per_s'] / 1e9:.0f}, "
        f"{measured['client_copy_gbps_alone']:.0f} without the memory load, "
        f"which ran at duty {measured['load_duty']:.2f})"
        if measured
        else ""
    )
    return [f"Emulated {emulate['name']}, {emulate['card_class']}{reached}.", ""]


def markdown(result: dict) -> str:
    gpus = ", ".join(g["name"] or "?" for g in result["machine"]["gpus"]) or "no GPU"
    cap = result["bandwidth_bytes_per_s"]
    lines = [
        f"# bench: {result['model']} at {format_bytes(result['budget_bytes'])}"
        + (f", uploads capped at {cap / 1e9:g} GB/s" if cap else ""),
        "",
        f"{result['backend']} · {gpus} · {result['machine']['cpu']} ({result['threads']} threads) · "
        f"{len(result['prompts'])} prompts × {result['n_predict']} tokens · -c {result['n_ctx']} · "
        f"rounds {result['rounds_completed']}/{result['rounds']}",
        "",
        *_emulation_lines(result.get("emulate")),
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|---|---|" + "---:|" * 10 + ":-:|---:|---:|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["configs"]]
    head = result["headline"]
    lines.append("")
    if head["edge_over_stock"] is not None:
        lines.append(
            f"Best edge-preattn ({head['best_edge']}) / best stock that fits ({head['best_stock']}): "
            f"**{head['edge_over_stock']:.2f}×**."
        )
    if head["prediction_over_lru"] is not None:
        lines.append(
            f"Best prediction mode ({head['best_prediction_mode']}) / lru: "
            f"**{head['prediction_over_lru']:.2f}×**."
        )
    if head["best_edge_measured_over_limit"] is not None:
        lines.append(
            f"{head['best_edge']} takes {head['best_edge_measured_over_limit']:.2f}× the time of its "
            "physical limit."
        )
    lines += [f"- {note}" for note in result["notes"]]
    lines += [
        f"- {row['name']}: prediction switched itself off (late or idle predictions) at ubatch "
        + ", ".join("–" if at is None else str(at) for at in row["prediction_off_at_ubatch"])
        + " of its rounds; it ran as lru from there"
        for row in result["configs"]
        if any(at is not None for at in row.get("prediction_off_at_ubatch") or [])
    ]
    split = [
        f"{row['name']} {row['ms_per_token_p50']:.2f} = {limit['resident_ms_per_token']:.2f} compute "
        f"+ {limit['bus_ms_per_token']:.2f} bus + {limit['other_ms_per_token']:.2f} other"
        for row in result["configs"]
        if (limit := row.get("physical_limit")) and "other_ms_per_token" in limit
    ]
    if split:
        lines.append(
            "- where the time goes, ms/token (p50) = all-on-GPU step + bytes uploaded ÷ bus rate + the "
            "rest (graph splits, host work; negative: uploads overlapped compute): " + "; ".join(split)
        )
    h2d = result["host_to_device"]
    if "error" in h2d:
        lines.append(f"- host → device bandwidth not measured ({h2d['error']}): no physical limits")
    else:
        pinned = h2d.get("pinned_bytes_per_s")
        lines.append(
            f"- host → {h2d['target']}: {h2d['pageable_bytes_per_s'] / 1e9:.2f} GB/s pageable"
            + (f", {pinned / 1e9:.2f} GB/s pinned" if pinned else "")
        )
    lines += [
        "",
        f"Command: `{result['command']}` · commit {result['commit']}",
        "",
    ]
    return "\n".join(lines)


def _figure(width: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 4))
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def bars_png(result: dict) -> bytes:
    rows = [r for r in result["configs"] if r["decode_tok_s"]]
    figure = _figure(max(6.0, 0.9 * len(rows)))
    axes = figure.add_subplot(1, 1, 1)
    medians = [r["decode_tok_s"]["median"] for r in rows]
    errors = [
        [m - r["decode_tok_s"]["min"] for m, r in zip(medians, rows, strict=True)],
        [r["decode_tok_s"]["max"] - m for m, r in zip(medians, rows, strict=True)],
    ]
    colors = ["#888888" if r["kind"] == "stock" else "#1f77b4" for r in rows]
    axes.bar(range(len(rows)), medians, yerr=errors, color=colors, capsize=3)
    limits = [r["physical_limit_tok_s"] for r in rows]
    axes.scatter(
        [i for i, v in enumerate(limits) if v],
        [v for v in limits if v],
        marker="_",
        s=300,
        color="red",
        label="physical limit",
    )
    axes.set_xticks(
        range(len(rows)), [r["name"] + ("*" if not r["fits_budget"] else "") for r in rows], rotation=30
    )
    axes.set(
        ylabel="decode tok/s (median, min–max)",
        title=f"{result['model']} at {format_bytes(result['budget_bytes'])}",
    )
    axes.grid(axis="y", alpha=0.3)
    if any(limits):
        axes.legend(fontsize=8)
    return _png(figure)


def sweep_png(results: list[dict]) -> bytes:
    figure = _figure(7.0)
    axes = figure.add_subplot(1, 1, 1)
    names = dict.fromkeys(r["name"] for result in results for r in result["configs"])
    scale, unit = (1024**3, "GiB") if max(r["budget_bytes"] for r in results) >= 1024**3 else (1024**2, "MiB")
    for name in names:
        points = [
            (result["budget_bytes"] / scale, row["decode_tok_s"]["median"])
            for result in results
            for row in result["configs"]
            if row["name"] == name and row["decode_tok_s"]
        ]
        if points:
            style = "--" if name in STOCK_CONFIGS else "-"
            axes.plot(*zip(*points, strict=True), style, marker="o", label=name)
    axes.set(
        xlabel=f"VRAM budget ({unit})",
        ylabel="decode tok/s (median)",
        title=f"{results[0]['model']}: tok/s vs budget",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(figure)


def write_results(out_dir: Path, stem: str, results: list[dict]) -> list[Path]:
    written = []
    for result in results:
        name = f"{stem}-{result['budget']}" + (f"-bw{result['bandwidth']}" if result["bandwidth"] else "")
        write_json_atomic(
            out_dir / f"{name}.json", {k: v for k, v in result.items() if k not in ("budget", "bandwidth")}
        )
        write_text_atomic(out_dir / f"{name}.md", markdown(result))
        written += [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    try:
        for result in results:
            name = f"{stem}-{result['budget']}" + (f"-bw{result['bandwidth']}" if result["bandwidth"] else "")
            write_bytes_atomic(out_dir / f"{name}.png", bars_png(result))
        for bandwidth in dict.fromkeys(r["bandwidth"] for r in results):
            group = [r for r in results if r["bandwidth"] == bandwidth]
            if len(group) > 1:
                path = out_dir / (f"{stem}-sweep" + (f"-bw{bandwidth}" if bandwidth else "") + ".png")
                write_bytes_atomic(path, sweep_png(group))
    except ImportError:
        log.warning("matplotlib is not installed: no PNG plots (pip install matplotlib)")
    return written


def parse_budget(text: str, layout: MoeLayout, n_ctx: int) -> int:
    """A size (`8GiB`), or `25%`: the budget whose slot plan holds that share of every layer's experts."""
    if not text.endswith("%"):
        return parse_bytes(text)
    try:
        share = float(text[:-1]) / 100
    except ValueError:
        raise UserError(
            f"cannot read budget {text!r}: write a size such as 8GiB or a share such as 25%"
        ) from None
    if not 0 < share <= 1:
        raise UserError(f"budget {text!r}: a share of the experts is between 0% and 100%")
    full = plan_slots(layout, 2**62, n_ctx)  # resident parts and slot size, whatever the budget
    slots = max(layout.n_expert_used, round(share * layout.n_expert))
    resident = full.non_expert_bytes + full.kv_cache_bytes + full.compute_buffer_bytes
    return resident + slots * full.n_moe_layers * full.bytes_per_slot


def parse_bandwidths(text: str | None) -> list[tuple[float | None, str]]:
    """`none,16GB/s` → [(None, ''), (16e9, '16GBps')]."""
    if not text:
        return [(None, "")]
    found = []
    for item in text.split(","):
        if item.strip().lower() in ("none", "off", "uncapped", "inf"):
            found.append((None, ""))
            continue
        rate = parse_rate(item)
        if rate <= 0:
            raise UserError("--bandwidth must be positive")
        found.append((rate, _label(item)))
    return found


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.gguf", help="the MoE GGUF to benchmark")
    parser.add_argument(
        "--vram-budget", required=True, metavar="SIZE[,SIZE...]", help="e.g. 8GiB, or a sweep 4GiB,8GiB,12GiB"
    )
    parser.add_argument(
        "--bandwidth",
        metavar="RATE[,RATE...]",
        help="cap on cache uploads, e.g. 16GB/s; none,8GB/s runs both",
    )
    parser.add_argument("--predictors", metavar="DIR", help="predictors for top1/exact/overprov/adaptive")
    parser.add_argument("-p", "--prompts", metavar="FILE", help="one prompt per line (default: 3 built in)")
    parser.add_argument("-n", "--n-predict", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all configurations (default 3)")
    parser.add_argument(
        "--configs",
        metavar="NAME[,NAME...]",
        help=f"any of {','.join(STOCK_CONFIGS + EDGE_CONFIGS)} (default all; the reference always runs)",
    )
    parser.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size (default 4096)")
    parser.add_argument(
        "-t", "--threads", type=int, help="CPU threads for every configuration (default: all cores)"
    )
    parser.add_argument("--extra", type=int, default=2, help="overprov: experts beyond k (default 2)")
    parser.add_argument("--target", type=float, default=0.95, help="adaptive: expected recall (default 0.95)")
    parser.add_argument(
        "--bypass-tokens", type=int, default=32, help="ubatches larger than this skip the cache"
    )
    parser.add_argument(
        "--stock-lib", metavar="DIR", help="unpatched library folder (default: the cached --stock build)"
    )
    parser.add_argument(
        "--run-timeout", type=float, default=900, help="seconds one configuration may take (900)"
    )
    parser.add_argument(
        "--copy-queue",
        action="store_true",
        help="every cache configuration queues its prefetches on a second GPU stream, with an event per "
        "slot that the routing waits for on the device (run --copy-queue)",
    )
    parser.add_argument(
        "--emulate",
        metavar="PROFILE",
        help="an edge GPU on an NVIDIA data-center card: CUDA MPS caps the SMs, the profile's bus rate "
        "caps every cache upload and its thread count every configuration; one of " + ", ".join(PROFILES),
    )
    parser.add_argument(
        "-o", "--output", default=".", help="folder for bench-<model>[-<profile>]-<budget>.json/.md/.png (.)"
    )


def _matrix(args: argparse.Namespace, layout: MoeLayout, n_ctx: int):
    """The command's checked choices: (config names, [(budget text, bytes)], [(rate, label)], prompts)."""
    from .collect import read_prompts

    if args.n_predict < 2:
        raise UserError("-n must be at least 2 (decode speed needs a second token)")
    if args.rounds < 1:
        raise UserError("--rounds must be at least 1")
    if not Path(args.output).is_dir():
        raise UserError(f"output folder {args.output} does not exist")
    if args.predictors and not Path(args.predictors).is_dir():
        raise UserError(f"--predictors {args.predictors} is not a folder")
    known = STOCK_CONFIGS + EDGE_CONFIGS
    names = [name.strip() for name in (args.configs or ",".join(known)).split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise UserError(f"unknown --configs {', '.join(unknown)}; choose from {', '.join(known)}")
    budgets = [
        (text, parse_budget(text, layout, n_ctx)) for text in args.vram_budget.split(",") if text.strip()
    ]
    prompts = tuple(read_prompts(Path(args.prompts))) if args.prompts else DEFAULT_PROMPTS
    return names, budgets, parse_bandwidths(args.bandwidth), prompts


def main(args: argparse.Namespace) -> int:
    profile = get_profile(args.emulate) if args.emulate else None
    if profile is None:
        return _bench(args, None, {})
    if args.threads or args.bandwidth:
        raise UserError(f"--emulate {profile.name} sets the threads and the bus: drop -t and --bandwidth")
    args.bandwidth = f"{profile.bus_bytes_per_s / 1e9:g}GB/s"
    with edge_gpu(profile) as emulation:
        return _bench(args, profile, emulation.env, emulation.measured)


def _bench(
    args: argparse.Namespace,
    profile: EdgeProfile | None,
    worker_env: dict[str, str],
    emulated: dict | None = None,
) -> int:
    import psutil
    from tqdm import tqdm

    from .machine import command_line, git_commit, machine_info

    layout = read_layout(args.model)
    n_ctx = min(args.ctx_size, layout.n_ctx_train or args.ctx_size)
    names, budgets, bandwidths, prompts = _matrix(args, layout, n_ctx)
    out_dir = Path(args.output)
    stem = f"bench-{Path(args.model).stem}" + (f"-{profile.name}" if profile else "")
    patched_lib, stock_lib = library_dirs(args.stock_lib)
    work = Workload(
        model=str(Path(args.model).resolve()),
        prompts=prompts,
        n_predict=args.n_predict,
        n_ctx=n_ctx,
        threads=(profile.cpu_threads if profile else args.threads)
        or psutil.cpu_count(logical=False)
        or os.cpu_count()
        or 1,
        predictors=str(Path(args.predictors).resolve()) if args.predictors else None,
        extra=args.extra,
        target=args.target,
        bypass_tokens=args.bypass_tokens,
        copy_queue=args.copy_queue,
    )
    # Runs are kept by what they measure, not by this command's matrix: a later bench of the same
    # workload (say, with --bandwidth capped and fewer --configs) reuses the stock runs made here.
    signature = {
        "fingerprint": layout.fingerprint,
        "workload": dataclasses.asdict(work),
        "libraries": [str(patched_lib), str(stock_lib)],
        "emulate": profile.name if profile else None,
    }
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:12]
    state_path = out_dir / f".{stem}-{digest}.state.json"
    state = (
        json.loads(state_path.read_text()) if state_path.is_file() else {"signature": signature, "runs": {}}
    )
    if state["runs"]:
        log.info("reusing the runs already in %s", state_path)
    if "error" in state.get("bandwidth", {"error": ""}):  # also says whether the build has a GPU
        state["bandwidth"] = run_worker({"task": "bandwidth"}, patched_lib, args.run_timeout, worker_env)
        if "gpu" not in state["bandwidth"]:
            raise UserError(
                f"the library in {patched_lib} failed ({state['bandwidth']['error']}):\n"
                + state["bandwidth"].get("log_tail", "")
            )
        write_json_atomic(state_path, state)
    gpu = bool(state["bandwidth"]["gpu"])
    runs, tables, notes, reference_key = plan_runs(
        layout,
        [size for _, size in budgets],
        [rate for rate, _ in bandwidths],
        names,
        gpu=gpu,
        n_ctx=n_ctx,
        has_predictors=bool(args.predictors),
    )
    order = [reference_key] + [key for key in runs if key != reference_key]
    log.info("%d configurations × %d rounds, each in its own process", len(order), args.rounds)
    shared = {
        "model": Path(args.model).name,
        "machine": machine_info(),
        "commit": git_commit(Path(__file__).resolve().parent),
        "command": command_line(),
        "backend": "gpu" if gpu else "cpu",
        "threads": work.threads,
        "n_ctx": n_ctx,
        "n_predict": args.n_predict,
        "prompts": list(prompts),
        "rounds": args.rounds,
        "reference": reference_key,
        "libraries": {"patched": str(patched_lib), "stock": str(stock_lib)},
        "emulate": {**dataclasses.asdict(profile), "measured": emulated} if profile else None,
    }

    def results_now() -> list[dict]:
        found = []
        for (budget, bandwidth), keys in tables.items():
            records = {key: state["runs"].get(key, []) for key in keys}
            rows = [
                summarize(runs[key], records[key], records[reference_key], state["bandwidth"], budget)
                for key in keys
            ]
            found.append(
                {
                    "model": shared["model"],
                    "machine": shared["machine"],
                    "commit": shared["commit"],
                    "command": shared["command"],
                    "budget_bytes": budget,
                    "bandwidth_bytes_per_s": bandwidth,
                    "configs": rows,
                    **shared,
                    "rounds_completed": min(len(r) for r in records.values()),
                    "host_to_device": state["bandwidth"],
                    "notes": notes[budget] + ([CAP_NOTE] if bandwidth else []),
                    "headline": headline(rows),
                    "budget": _label(next(text for text, size in budgets if size == budget)),
                    "bandwidth": next(label for rate, label in bandwidths if rate == bandwidth),
                }
            )
        return found

    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupted)
    progress = tqdm(total=len(order) * args.rounds, desc="bench", unit="run", disable=None)
    progress.update(sum(min(len(state["runs"].get(key, [])), args.rounds) for key in order))
    try:
        for round_index in range(args.rounds):
            for key in order:
                done = state["runs"].setdefault(key, [])
                if len(done) > round_index:
                    continue
                spec = runs[key]
                job = {"task": "run", "spec": dataclasses.asdict(spec), "workload": dataclasses.asdict(work)}
                lib = stock_lib if spec.kind == "stock" else patched_lib
                record = run_worker(job, lib, args.run_timeout, worker_env)
                done.append(record)
                write_json_atomic(state_path, state)
                progress.update()
                if "error" in record:
                    log.warning("%s failed: %s\n%s", key, record["error"], record.get("log_tail", ""))
                else:
                    progress.set_postfix_str(f"{key}: {record['decode_tok_s']:.1f} tok/s")
            write_results(out_dir, stem, results_now())
    except (KeyboardInterrupt, Interrupted) as stop:
        written = write_results(out_dir, stem, results_now())
        progress.close()
        print(
            f"interrupted: partial results in {written[0].parent}; the same command resumes", file=sys.stderr
        )
        return 128 + signal.SIGTERM if isinstance(stop, Interrupted) else 130  # like `timeout` expects
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    progress.close()
    results = results_now()
    written = write_results(out_dir, stem, results)
    if len(results) == 1:
        print(markdown(results[0]))
    for result in results:
        print(f"{result['budget']} {result['bandwidth'] or 'uncapped'}: {result['headline']}")
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
