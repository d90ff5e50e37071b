"""`edge-preattn run`: stream text from a MoE GGUF through the patched llama.cpp.

Placement flags mean what llama.cpp's mean (`-ngl`, `--cpu-moe`, `--n-cpu-moe`, `-ot`), so a user
can reproduce any stock offload configuration here and compare it with the expert cache.
"""

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import build, native
from .engine import Engine, EngineConfig, Generation, Sampling, expert_overrides, stream_text
from .errors import UserError
from .files import write_json_atomic

log = logging.getLogger(__name__)

HELP = "generate text from a MoE GGUF (default: the packaged model), streaming, with timing statistics"
EXAMPLES = """\
  edge-preattn run                                   # packaged default model
  edge-preattn run -m model.gguf -p "def quicksort(xs):" -n 128
  edge-preattn run -m model.gguf --cpu-moe           # all routed experts in host RAM (like -ot exps=CPU)
  edge-preattn run -m model.gguf --n-cpu-moe 20 -ngl 99 --stats-json stats.json
"""

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_MODEL_PRESET = "tiny"


def default_model() -> Path:
    """The packaged default model; until a trained one ships, the `tiny` synthetic model, made once."""
    from . import synth

    path = build.cache_dir() / "models" / f"synth-{DEFAULT_MODEL_PRESET}-seed0.gguf"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        synth.write_synthetic(DEFAULT_MODEL_PRESET, path, progress=False)
    return path


@dataclass(frozen=True)
class RunStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_token_p50: float
    ms_per_token_p95: float

    @staticmethod
    def of(record: Generation) -> "RunStats":
        ms = np.array(record.decode_seconds) * 1e3 if record.decode_seconds else np.zeros(1)
        return RunStats(
            prompt_tokens=len(record.prompt_tokens),
            generated_tokens=len(record.tokens),
            prefill_tok_s=round(record.prefill_tok_s, 2),
            decode_tok_s=round(record.decode_tok_s, 2),
            ms_per_token_p50=round(float(np.percentile(ms, 50)), 3),
            ms_per_token_p95=round(float(np.percentile(ms, 95)), 3),
        )


def parse_override(text: str) -> tuple[str, str]:
    pattern, sep, device = text.rpartition("=")
    if not sep or not pattern or not device:
        raise UserError(f"cannot read tensor override {text!r}: write PATTERN=DEVICE, e.g. exps=CPU")
    return pattern, device


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model", help="GGUF file (default: the packaged default model)")
    parser.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="prompt text")
    parser.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate (default 64)")
    parser.add_argument(
        "-c", "--ctx-size", type=int, default=0, help="context size (default min(4096, trained))"
    )
    parser.add_argument("-t", "--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    parser.add_argument(
        "-ngl", "--n-gpu-layers", type=int, default=-1, help="layers on the GPU (default all)"
    )
    placement = parser.add_mutually_exclusive_group()
    placement.add_argument("--cpu-moe", action="store_true", help="keep every routed expert in host RAM")
    placement.add_argument(
        "--n-cpu-moe", type=int, metavar="N", help="routed experts of the first N layers in RAM"
    )
    parser.add_argument(
        "-ot",
        "--override-tensor",
        action="append",
        default=[],
        metavar="PATTERN=DEVICE",
        help="place tensors matching PATTERN on DEVICE (CPU, CUDA0, ...); repeatable",
    )
    parser.add_argument("--temp", type=float, default=0.0, help="temperature (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", choices=build.PRESETS, help="which build to load (default: detected)")
    parser.add_argument("--stock", action="store_true", help="load the unpatched build (for comparisons)")
    parser.add_argument("--stats-json", metavar="FILE", help="write the run's statistics as JSON")


def main(args: argparse.Namespace) -> int:
    if args.n_predict <= 0:
        raise UserError(f"-n must be at least 1 (got {args.n_predict})")
    if not args.prompt.strip():
        raise UserError("the prompt is empty: give some text with -p")
    model = Path(args.model) if args.model else default_model()
    overrides = tuple(parse_override(text) for text in args.override_tensor)
    if args.cpu_moe:
        overrides += expert_overrides(None)
    elif args.n_cpu_moe is not None:
        overrides += expert_overrides(args.n_cpu_moe)
    llama_cpp = native.load_llama(native.find_library(args.preset, stock=args.stock))
    config = EngineConfig(
        model_path=str(model),
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        overrides=overrides,
    )
    with Engine(llama_cpp, config) as engine:
        sampling = Sampling(temperature=args.temp, top_p=args.top_p, seed=args.seed)
        record = None
        sys.stdout.write(args.prompt)
        for text, current in stream_text(engine, engine.generate(args.prompt, args.n_predict, sampling)):
            sys.stdout.write(text)
            sys.stdout.flush()
            record = current
        sys.stdout.write("\n")
        stats = RunStats.of(record)
        print(f"[{model.name}] {engine.api.build_info()}", file=sys.stderr)
        print(
            f"prefill {stats.prompt_tokens} tok at {stats.prefill_tok_s:.1f} tok/s | decode "
            f"{stats.generated_tokens} tok at {stats.decode_tok_s:.1f} tok/s "
            f"(p50 {stats.ms_per_token_p50:.2f} ms, p95 {stats.ms_per_token_p95:.2f} ms)",
            file=sys.stderr,
        )
    if args.stats_json:
        write_json_atomic(Path(args.stats_json), {"model": str(model), **stats.__dict__})
    return 0
