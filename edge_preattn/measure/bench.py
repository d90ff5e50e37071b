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
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UserError
from ..files import write_json_atomic
from ..model import build, native
from ..model.layout import MoeLayout, plan_slots, read_layout
from ..units import parse_bytes, parse_rate
from .bench_plan import EDGE_CONFIGS, STOCK_CONFIGS, Workload, plan_runs
from .bench_report import file_label, headline, markdown, summarize, write_results
from .emulate import PROFILES, EdgeProfile, edge_gpu, get_profile

log = logging.getLogger(__name__)

HELP = "stock llama.cpp offload vs the expert cache at a VRAM budget: tok/s, VRAM, cache stats, same tokens"
EXAMPLES = """\
  edge-preattn bench model.gguf --vram-budget 8GiB --predictors preds/ -o results/
  edge-preattn bench model.gguf --vram-budget 6GiB,10GiB,14GiB --bandwidth none,16GB/s --predictors preds/
  edge-preattn bench model.gguf --vram-budget 8GiB --configs exps-cpu,lru,oracle -n 16 --rounds 1
"""

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
        command = [sys.executable, "-m", "edge_preattn.measure.bench_worker", str(job_path), str(out_path)]
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
        found.append((rate, file_label(item)))
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
    parser.add_argument(
        "--lead-predictors",
        metavar="DIR",
        help="predictors trained with `train --lead` for the top1/exact/overprov+lead configurations",
    )
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
    from ..traces.collect import read_prompts

    if args.n_predict < 2:
        raise UserError("-n must be at least 2 (decode speed needs a second token)")
    if args.rounds < 1:
        raise UserError("--rounds must be at least 1")
    if not Path(args.output).is_dir():
        raise UserError(f"output folder {args.output} does not exist")
    if args.predictors and not Path(args.predictors).is_dir():
        raise UserError(f"--predictors {args.predictors} is not a folder")
    if args.lead_predictors:
        from ..predictors.onnx_io import load_predictor_set

        lead_set = load_predictor_set(Path(args.lead_predictors), fingerprint=layout.routing_fingerprint)
        if not lead_set.lead:
            raise UserError(
                f"--lead-predictors {args.lead_predictors} was trained without --lead: give it as "
                "--predictors"
            )
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
        lead_predictors=str(Path(args.lead_predictors).resolve()) if args.lead_predictors else None,
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
        has_lead_predictors=bool(args.lead_predictors),
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
                    "budget": file_label(next(text for text, size in budgets if size == budget)),
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
