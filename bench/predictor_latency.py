"""Predictor latency: one layer's predictor call at batch 1 (one decode token), onnxruntime on the CPU.

Times (a) the predictors of a folder written by `edge-preattn train`, through `PredictorSet.scores`
(what the runtime calls), when --predictors is given, and (b) a Qwen3-30B-A3B-sized predictor
(d 2048, h 2048, E 128; architecture 2 by default) with random weights, exported to ONNX here, in
fp32 and int8 (onnxruntime.quantization.quantize_dynamic), each with 1 intra-op thread and with
onnxruntime's default. p50/p99 over --calls calls after --warmup calls. The paper reports 0.15 ms per
prediction; our target is ≤ 0.10 ms p50 on one thread.

Writes bench/results/predictor-latency.json and .md. Run from the repo root:
    python bench/predictor_latency.py [--predictors predictors/moe-ref-a-arch2] [--arch 1 2]
"""

import argparse
import contextlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_preattn.files import write_json_atomic, write_text_atomic
from edge_preattn.predictors import metrics, onnx_io

QWEN3_30B_A3B = {"d": 2048, "h": 2048, "E": 128, "k": 8}
THREADS = {"1": 1, "default": 0}  # 0: onnxruntime picks (one per physical core)


def export_random(arch: int, d: int, h: int, n_expert: int, path: Path) -> None:
    """A paper-architecture predictor with random weights (seed 0), as ONNX x [N, d] → scores [N, E]."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter, as onnx_io
    if arch == 1:  # Linear → BatchNorm1d → GELU → Dropout → Linear (eval: BN is an affine map)
        body = [nn.Linear(d, h), nn.BatchNorm1d(h), nn.GELU(), nn.Dropout(0.1), nn.Linear(h, n_expert)]
    else:  # Linear → SiLU → Linear
        body = [nn.Linear(d, h), nn.SiLU(), nn.Linear(h, n_expert)]
    model = nn.Sequential(*body).eval()
    torch.onnx.export(
        model,
        (torch.zeros(2, d),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["scores"],
        dynamic_axes={"x": {0: "n_tokens"}, "scores": {0: "n_tokens"}},
        opset_version=onnx_io.OPSET,
    )


def quantize(path: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_name(path.stem + ".int8.onnx")
    logging.getLogger().setLevel(logging.ERROR)  # its advice to pre-process is for conv nets
    quantize_dynamic(path, out, weight_type=QuantType.QInt8)
    return out


def percentiles(call, warmup: int, calls: int) -> dict:
    """Milliseconds per call: p50, p99, mean, min over `calls` after `warmup` untimed calls."""
    for _ in range(warmup):
        call()
    times = np.empty(calls)
    for i in range(calls):
        started = time.perf_counter_ns()
        call()
        times[i] = time.perf_counter_ns() - started
    ms = times / 1e6
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "mean_ms": round(float(ms.mean()), 4),
        "min_ms": round(float(ms.min()), 4),
        "calls": calls,
    }


def time_file(path: Path, d: int, threads: int, warmup: int, calls: int) -> dict:
    session = ort.InferenceSession(
        str(path), onnx_io.session_options(threads), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).standard_normal((1, d)).astype(np.float32)  # batch 1
    return percentiles(lambda: session.run(["scores"], {"x": x}), warmup, calls)


def int8_agreement(fp32: Path, int8: Path, d: int, k: int, rows: int = 2000) -> float:
    """recall@k of the int8 model's ranking against the fp32 model's top-k, on random inputs (random
    weights: a check that quantization keeps the ranking, not the accuracy cost on a real model)."""
    x = np.random.default_rng(1).standard_normal((rows, d)).astype(np.float32)
    reference = metrics.ranked(onnx_io.onnx_scores(fp32, x), k)
    quantized = metrics.ranked(onnx_io.onnx_scores(int8, x), k)
    return round(float(metrics.recall_at_k(quantized, reference).mean()), 4)


def time_predictor_set(directory: Path, threads: int, warmup: int, calls: int, int8: bool) -> dict:
    """Every layer of a trained set through PredictorSet.scores, `calls` calls per layer."""
    pset = onnx_io.load_predictor_set(directory, threads=threads, int8=int8)
    x = np.random.default_rng(0).standard_normal((1, pset.n_embd)).astype(np.float32)
    per_layer = {il: percentiles(lambda il=il: pset.scores(il, x), warmup, calls) for il in pset.layers}
    p50s = [r["p50_ms"] for r in per_layer.values()]
    return {
        "p50_ms": round(float(np.median(p50s)), 4),
        "p99_ms": max(r["p99_ms"] for r in per_layer.values()),
        "mean_ms": round(float(np.mean([r["mean_ms"] for r in per_layer.values()])), 4),
        "worst_layer_p50_ms": max(p50s),
        "layers": len(per_layer),
        "calls": calls,
    }


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "system": platform.platform(),
        "load_average_1min_at_start": round(os.getloadavg()[0], 2),  # other work on the machine skews times
    }


def git_sha() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = ["git", "status", "--porcelain"]
        dirty = subprocess.run(status, capture_output=True, text=True, check=True).stdout
        return sha.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(result: dict) -> str:
    lines = [
        "# Predictor latency: one layer call at batch 1, onnxruntime CPU",
        "",
        f"Machine: {result['machine']['cpu']}, {result['machine']['logical_cpus']} logical CPUs "
        f"({result['machine_note']}; 1-min load average {result['machine']['load_average_1min_at_start']} at "
        f"start); onnxruntime {result['onnxruntime']}; {result['calls']} timed calls "
        f"after {result['warmup']} warm-up; git {result['git'][:12]}. Paper: 0.15 ms per prediction; "
        "target ≤ 0.10 ms p50 on one thread.",
        "",
        "| predictor | d | h | E | weights | threads | p50 ms | p99 ms | mean ms | int8 effect |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        agreement = row.get("int8_topk_agreement", "")
        if "int8_val_recall_at_k_change" in row:
            agreement = f"val recall@k {100 * row['int8_val_recall_at_k_change']:+.2f} pts"
        lines.append(
            f"| {row['predictor']} | {row['d']} | {row['h']} | {row['E']} | {row['precision']} | "
            f"{row['threads']} | {row['p50_ms']:.4f} | {row['p99_ms']:.4f} | {row.get('mean_ms', '')} | "
            f"{agreement} |"
        )
    sources = {
        (r["predictor"], r["directory"], r.get("train_tokens")) for r in result["rows"] if "directory" in r
    }
    lines += [""] + [
        f"- {name}: {folder} (trained on {tokens} tokens)" for name, folder, tokens in sorted(sources)
    ]
    lines += [
        "",
        "Trained sets are timed through `PredictorSet.scores` (p50: median of the layers' p50s; p99: the "
        "worst layer's). Random-weight models through `InferenceSession.run` with the same session "
        "options. int8 effect: for a trained set, the change of mean validation recall@k that train "
        "measured; for random weights, recall@k of the int8 ranking against the fp32 top-k on random "
        "inputs (a check of the ranking only: random weights say nothing of the accuracy cost).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--predictors", type=Path, help="a folder written by `edge-preattn train`")
    parser.add_argument("--arch", type=int, nargs="+", default=[2], choices=(1, 2))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--machine-note", default="", help="e.g. '2-core VM'")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    started_on = machine()
    rows = []
    if args.predictors:
        manifest = onnx_io.load_predictor_set(args.predictors).manifest
        name = f"{manifest.get('model_name') or args.predictors.name} arch{manifest['arch']}"
        entries = manifest["predictors"]
        int8_options = [False, True] if all("int8" in e for e in entries) else [False]
        for int8 in int8_options:
            for label, threads in THREADS.items():
                timing = time_predictor_set(args.predictors, threads, args.warmup, args.calls, int8)
                if int8:  # the accuracy cost, as train measured it on the validation prompts
                    cost = [e["int8"]["val_recall_at_k"] - e["int8"]["fp32_val_recall_at_k"] for e in entries]
                    timing["int8_val_recall_at_k_change"] = round(float(np.mean(cost)), 4)
                rows.append(
                    {
                        "predictor": name,
                        "directory": str(args.predictors),
                        "train_tokens": manifest.get("train_tokens"),
                        "d": manifest["n_embd"],
                        "h": manifest.get("hidden"),
                        "E": manifest["n_expert"],
                        "precision": "int8" if int8 else "fp32",
                        "threads": label,
                        **timing,
                    }
                )
    shape = QWEN3_30B_A3B
    with tempfile.TemporaryDirectory() as scratch:
        for arch in args.arch:
            fp32 = Path(scratch) / f"qwen3-30b-a3b-arch{arch}.onnx"
            export_random(arch, shape["d"], shape["h"], shape["E"], fp32)
            int8 = quantize(fp32)
            agreement = int8_agreement(fp32, int8, shape["d"], shape["k"])
            for precision, path in (("fp32", fp32), ("int8", int8)):
                for label, threads in THREADS.items():
                    row = {
                        "predictor": f"Qwen3-30B-A3B-sized arch{arch} (random weights)",
                        "d": shape["d"],
                        "h": shape["h"],
                        "E": shape["E"],
                        "precision": precision,
                        "threads": label,
                        "file_bytes": path.stat().st_size,
                        **time_file(path, shape["d"], threads, args.warmup, args.calls),
                    }
                    if precision == "int8":
                        row["int8_topk_agreement"] = agreement
                    rows.append(row)
                    print(f"{row['predictor']} {precision} threads={label}: p50 {row['p50_ms']:.4f} ms")
    result = {
        "machine": started_on,
        "machine_note": args.machine_note,
        "onnxruntime": ort.__version__,
        "git": git_sha(),
        "command": " ".join(sys.argv),
        "calls": args.calls,
        "warmup": args.warmup,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "predictor-latency.json", result)
    write_text_atomic(args.out / "predictor-latency.md", markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
