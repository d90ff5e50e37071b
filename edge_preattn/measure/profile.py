"""`edge-preattn profile`: where a decode step's time goes per MoE layer, and what moving experts costs.

It times each part of a MoE layer, the paper's Table 1 (layer_timing.py), and moving experts from
disk and RAM into device memory, its Table 5, with the host→device bandwidth (transfers.py); this
module runs both and writes the report.
"""

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import write_json_atomic, write_text_atomic
from ..model import native
from ..model.engine import Engine, EngineConfig
from ..model.layout import read_layout
from ..units import format_bytes
from .layer_timing import OP_CLASSES, NodeTimer, greedy_steps, time_layer_ops
from .machine import command_line, git_commit, machine_info
from .transfers import bind_ggml, measure_bandwidth, time_expert_loads

log = logging.getLogger(__name__)

HELP = "time each part of a MoE layer (Table 1) and expert loads disk/RAM → GPU (Table 5); JSON + markdown"
EXAMPLES = """\
  edge-preattn profile model.gguf
  edge-preattn profile model.gguf -n 100 --samples 100 -o bench/results
"""

WARMUP_STEPS = 4


def _table1_lines(t1: dict) -> list[str]:
    lines = [
        f"## Per MoE layer, one decode step (Table 1 analogue; {t1['decode_steps']} steps × "
        f"{t1['moe_layers']} layers)",
        "",
        "| operation | mean ms | std ms | samples |",
        "|---|---:|---:|---:|",
    ]
    for kind in OP_CLASSES:
        row = t1["ops"][kind]
        if row["samples"]:
            name = kind.replace("_", " ")
            lines.append(f"| {name} | {row['mean_ms']:.4f} | {row['std_ms']:.4f} | {row['samples']} |")
    return [
        *lines,
        "",
        f"Observation overhead subtracted: {t1['observation_overhead_ms']['median']:.4f} ms per segment "
        f"({t1['observations_per_step']} observations per step). Decode step (mean): "
        f"{t1['plain_step_ms']:.3f} ms plain, {t1['observed_step_ms']:.3f} ms observed; "
        f"MoE layers' segments sum to {t1['moe_layers_sum_ms']:.3f} ms.",
        f"Method: {t1['method']}.",
    ]


def _table5_lines(t5: dict) -> list[str]:
    lines = [
        f"## Expert loads (Table 5 analogue; k = {t5['k']}, {t5['samples']} samples, into {t5['target']})",
        "",
        "| source → target (host memory) | 1 expert ms | k experts ms | GB/s (k) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in t5["rows"].items():
        if not row["available"]:
            lines.append(f"| {name} | n/a ({row['why']}) | | |")
            continue
        one, several = row["one_expert"], row["k_experts"]
        lines.append(
            f"| {name} | {one['mean_ms']:.3f} ± {one['std_ms']:.3f} | {several['mean_ms']:.3f} ± "
            f"{several['std_ms']:.3f} | {row['k_bytes_per_s'] / 1e9:.2f} |"
        )
    per_expert = max(row.get("bytes_per_expert", 0) for row in t5["rows"].values())
    return [
        *lines,
        "",
        f"Bytes per expert: {format_bytes(per_expert)}; disk read "
        f"{t5['disk_read_bytes_per_s'] / 1e9:.2f} GB/s ({t5['note']}).",
    ]


def _bandwidth_lines(bandwidth: dict) -> list[str]:
    pinned = bandwidth["pinned_bytes_per_s"]
    return [
        f"Host → {bandwidth['target']}: {bandwidth['pageable_bytes_per_s'] / 1e9:.2f} GB/s pageable"
        + (f", {pinned / 1e9:.2f} GB/s pinned" if pinned else ", pinned n/a")
        + f" ({format_bytes(bandwidth['transfer_bytes'])} copies, median of {bandwidth['repeats']})."
    ]


def markdown(report: dict) -> str:
    gpus = ", ".join(g["name"] or "?" for g in report["machine"]["gpus"]) or "no GPU"
    lines = [f"# profile: {report['model']}", "", f"{report['build']} · {report['machine']['cpu']} · {gpus}"]
    for key, render in (
        ("table1", _table1_lines),
        ("table5", _table5_lines),
        ("bandwidth", _bandwidth_lines),
    ):
        lines.append("")
        if "error" in report[key]:
            lines.append(f"{key}: failed: {report[key]['error']}")
        else:
            lines += render(report[key])
    lines += ["", f"Command: `{report['command']}` · commit {report['commit']}"]
    return "\n".join(lines) + "\n"


def _measured(what: str, measure) -> dict:
    """One table; a failure is reported in its place so that the other tables are still written."""
    try:
        return measure()
    except (UserError, RuntimeError, OSError, ValueError) as error:
        log.warning("%s failed: %r", what, error)
        return {"error": repr(error)}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.gguf", help="the MoE GGUF to profile")
    parser.add_argument("-p", "--prompt", default="def fibonacci(n):", help="prompt before the timed steps")
    parser.add_argument(
        "-n", "--n-predict", type=int, default=64, help="timed decode steps (>= 50; default 64)"
    )
    parser.add_argument("--samples", type=int, default=50, help="expert-load samples per row (default 50)")
    parser.add_argument("-c", "--ctx-size", type=int, default=512, help="context size (default 512)")
    parser.add_argument("-t", "--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    parser.add_argument(
        "-ngl", "--n-gpu-layers", type=int, default=-1, help="layers on the GPU (default all)"
    )
    parser.add_argument("-o", "--output", default=".", help="folder for profile-<model>.json/.md (default .)")


def main(args: argparse.Namespace) -> int:
    if args.n_predict < 50:
        raise UserError(
            f"-n {args.n_predict}: the tables need at least 50 samples per layer; use -n 50 or more"
        )
    if args.samples < 1:
        raise UserError("--samples must be at least 1")
    out_dir = Path(args.output)
    if not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} does not exist")
    layout = read_layout(args.model)
    llama_cpp = native.load_llama(native.find_library())
    api = native.NativeApi(llama_cpp)
    timer = NodeTimer(llama_cpp, bind_ggml(api))

    def with_callback(params) -> None:
        params.cb_eval = timer.callback

    config = EngineConfig(
        str(args.model), n_ctx=args.ctx_size, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers
    )

    def table1() -> dict:
        with Engine(llama_cpp, config) as engine:  # no callback: the step time without observation
            plain_ms = np.array(greedy_steps(engine, args.prompt, WARMUP_STEPS + args.n_predict)) * 1e3
        with Engine(llama_cpp, config, context_params_hook=with_callback) as engine:
            log.info("timing layer operations over %d decode steps", args.n_predict)
            table = time_layer_ops(engine, timer, layout, args.prompt, args.n_predict, warmup=WARMUP_STEPS)
        return {**table, "plain_step_ms": float(np.mean(plain_ms[WARMUP_STEPS:]))}

    report = {
        "model": Path(args.model).name,
        "machine": machine_info(),
        "build": api.build_info(),
        "library": os.environ.get("LLAMA_CPP_LIB_PATH"),
        "commit": git_commit(Path(__file__).resolve().parent),
        "command": command_line(),
        "table1": _measured("table 1", table1),
        "table5": _measured("table 5", lambda: time_expert_loads(api, layout, args.samples)),
        "bandwidth": _measured("bandwidth", lambda: measure_bandwidth(api)),
    }
    stem = f"profile-{Path(args.model).stem}"
    write_json_atomic(out_dir / f"{stem}.json", report)
    text = markdown(report)
    write_text_atomic(out_dir / f"{stem}.md", text)
    print(text)
    return 0
