"""`edge-preattn run`: stream text from a MoE GGUF through the patched llama.cpp.

Placement flags mean what llama.cpp's mean (`-ngl`, `--cpu-moe`, `--n-cpu-moe`, `-ot`), so a user
can reproduce any stock offload configuration here and compare it with the expert cache.
"""

import argparse
import contextlib
import dataclasses
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

from ..errors import UserError
from ..files import output_target, write_json_atomic
from ..interrupts import deferred
from ..model import build, native
from ..model.engine import Engine, EngineConfig, Sampling, expert_overrides, stream_text
from ..model.layout import MoeLayout, plan_slots, read_layout
from ..units import parse_bytes, parse_rate
from .cache import EVICTION_POLICIES
from .cache_runtime import CacheRuntime, record_routing
from .options import (
    MISS_POLICIES,
    MODES,
    PREDICTION_MODES,
    PREDICTOR_DEVICES,
    PREDICTOR_ENGINES,
    RESIDENCIES,
    CacheOptions,
)
from .slots import shrink_until_allocated
from .stats import format_layers, format_stats, run_stats

HELP = "generate text from a MoE GGUF (default: the packaged model), streaming, with timing statistics"
EXAMPLES = """\
  edge-preattn run                                   # packaged default model, sampled (a random seed)
  edge-preattn run --temp 0                          # greedy: the same text on every run
  edge-preattn run -m model.gguf -p "def quicksort(xs):" -n 128 --seed 42
  edge-preattn run -m model.gguf --cpu-moe           # stock: all routed experts in host RAM (-ot exps=CPU)
  edge-preattn run -m model.gguf --n-cpu-moe 20 -ngl 99 --stats-json stats.json
  edge-preattn run -m model.gguf --mode lru --slots 32            # expert cache, load on demand
  edge-preattn run -m model.gguf --mode top1 --predictors preds/ --vram-budget 6GiB --bandwidth 12GB/s
  edge-preattn run -m model.gguf --mode overprov --extra 4 --predictors preds/ --slots 48 --verbose
  edge-preattn run -m model.gguf --mode exact --predictors preds/ --slots 16 --miss cpu  # misses on the CPU
"""

DEFAULT_PROMPT = "def fibonacci(n):"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # edge_preattn/, which ships data/ and onnx_models/
DEFAULT_MODEL = PACKAGE_DIR / "data" / "edge-moe-default.gguf"  # card: data/edge-moe-default.md
DEFAULT_PREDICTORS = PACKAGE_DIR / "onnx_models" / "edge-moe-default"
DEFAULT_MODEL_MODE = "top1"
RANDOM_SEED = -1  # llama.cpp's LLAMA_DEFAULT_SEED (0xFFFFFFFF) as its CLI prints it: draw a seed
LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # the same, as llama.cpp's uint32
MAX_SEED = LLAMA_DEFAULT_SEED - 1


def apply_default_model(args: argparse.Namespace) -> None:
    """No `-m`: run the packaged model with its shipped predictors in `top1` mode, so the first command
    a newcomer types shows prediction and prefetching at work. With `-m`, or with a stock placement
    flag, the default mode is stock placement."""
    stock_placement = args.cpu_moe or args.n_cpu_moe is not None or args.override_tensor
    if args.model is None:
        args.model = str(DEFAULT_MODEL)
        if not stock_placement:
            args.mode = args.mode or DEFAULT_MODEL_MODE
        if args.mode in PREDICTION_MODES and not args.predictors:
            args.predictors = str(DEFAULT_PREDICTORS)
    args.mode = args.mode or "off"


def parse_override(text: str) -> tuple[str, str]:
    pattern, sep, device = text.rpartition("=")
    if not sep or not pattern or not device:
        raise UserError(f"cannot read tensor override {text!r}: write PATTERN=DEVICE, e.g. exps=CPU")
    return pattern, device


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--prompt", default=DEFAULT_PROMPT, help="prompt text")
    parser.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    parser.add_argument("--stats-json", metavar="FILE", help="write the run's statistics as JSON")
    add_engine_args(parser)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """The model, placement, sampling and expert-cache options that `run` and `serve` share."""
    parser.add_argument("-m", "--model", help="GGUF file (default: the packaged default model)")
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
    parser.add_argument("--preset", choices=build.PRESETS, help="which build to load (default: detected)")
    parser.add_argument("--stock", action="store_true", help="load the unpatched build (for comparisons)")
    sampling = parser.add_argument_group(
        "sampling (llama.cpp's defaults; it picks among the logits, never changes the cache or prediction)"
    )
    sampling.add_argument("--temp", type=float, default=0.8, help="temperature; 0: greedy (default 0.8)")
    sampling.add_argument("--top-k", type=int, default=40, help="top-k sampling, 0: off (default 40)")
    sampling.add_argument("--top-p", type=float, default=0.95, help="top-p sampling, 1.0: off (default 0.95)")
    sampling.add_argument("--min-p", type=float, default=0.05, help="min-p sampling, 0.0: off (default 0.05)")
    sampling.add_argument(
        "--repeat-penalty",
        type=float,
        default=1.0,
        help="penalize the last 64 tokens' repeats, 1.0: off (default 1.0)",
    )
    sampling.add_argument(
        "-s",
        "--seed",
        type=int,
        default=RANDOM_SEED,
        help=f"RNG seed (default {RANDOM_SEED}: a random one, printed so the text can be repeated)",
    )
    cache = parser.add_argument_group("expert cache (modes other than off)")
    cache.add_argument(
        "--mode",
        choices=MODES,
        help="off: stock placement (the default; top1 for the packaged model); lru: cache, load on "
        "demand; top1/exact/overprov: prefetch predicted experts; oracle: prefetch the true experts "
        "of a recorded run (upper bound)",
    )
    cache.add_argument(
        "--predictors",
        metavar="DIR",
        help="predictors made by `edge-preattn train` for this model (default: the packaged model's "
        "own, for the packaged model)",
    )
    sizing = cache.add_mutually_exclusive_group()
    sizing.add_argument(
        "--slots",
        type=int,
        help="expert slots per MoE layer, at least the router's k (default: a quarter of a layer's "
        "experts, or what --vram-budget fits)",
    )
    sizing.add_argument(
        "--vram-budget", type=parse_bytes, metavar="SIZE", help="e.g. 6GiB: slots from the plan"
    )
    cache.add_argument(
        "--bandwidth",
        type=parse_rate,
        metavar="RATE",
        help="model a slower host-to-device bus for every upload (prefetches and misses), e.g. 12GB/s "
        "(default: the real bus)",
    )
    cache.add_argument(
        "--extra", type=int, default=2, help="overprov: experts beyond k to prefetch (default 2)"
    )
    cache.add_argument(
        "--target",
        type=float,
        default=0.95,
        help="adaptive: expected recall each token's prefetch aims at (default 0.95)",
    )
    cache.add_argument(
        "--eviction",
        choices=EVICTION_POLICIES,
        default="lru",
        help="which resident expert a new one replaces",
    )
    cache.add_argument(
        "--miss",
        choices=MISS_POLICIES,
        default="upload",
        help="a selected expert that is not resident: upload it now (default), compute it on the CPU "
        "from host RAM (cpu), or whichever measured cost is lower (auto)",
    )
    cache.add_argument(
        "--residency",
        choices=RESIDENCIES,
        default="routing",
        help="when the cache decides what is resident: at each layer's routing (default; a graph split and "
        "a host synchronization per layer), or between tokens (token: the graph logs the routing on the "
        "device, misses are computed by the host side as with --miss cpu and uploaded after the token; "
        "lru, oracle and the library's own predictors)",
    )
    cache.add_argument(
        "--lookahead",
        type=int,
        default=0,
        metavar="N",
        help="prediction modes: at each layer's pre-attention hook also predict and prefetch the next N "
        "layers' experts, with their own predictors on this layer's activation (earlier, less "
        "accurate; default 0); not with predictors that read history inputs, as the packaged ones do",
    )
    cache.add_argument(
        "--predictor-engine",
        choices=PREDICTOR_ENGINES,
        default="native",
        help="who evaluates pre-attention predictors: the library itself on the decode thread, no Python "
        "per token (default; falls back to onnxruntime, with a warning, for graphs it cannot read), or "
        "onnxruntime on a Python prefetch thread",
    )
    cache.add_argument(
        "--predictor-threads",
        type=int,
        default=0,
        metavar="N",
        help="the library's predictors as ggml graphs on a CPU backend with N threads (SIMD, parallel); "
        "0 (default): a plain loop on the decode thread, enough for small predictors",
    )
    cache.add_argument(
        "--predictor-device",
        choices=PREDICTOR_DEVICES,
        default="cpu",
        help="where the library's predictors run: cpu (default: on the host, at each cached layer's "
        "pre-attention output, the decode thread waiting for it) or gpu (nodes of the model's graph on the "
        "GPU, the device itself prefetching what they predict on the copy queue: no host synchronization "
        "per layer; needs --residency token, implies --copy-queue; on a CPU-only build the nodes run on "
        "the CPU). On an H100 the two decode within 7%% of each other (bench/results/predictor-in-graph/), "
        "so the default keeps the path measured longest",
    )
    cache.add_argument(
        "--predictor-fp16",
        action="store_true",
        help="the library's predictors hold their matrices in float16: half the bytes, in GPU memory with "
        "--predictor-device gpu (needs it, or --predictor-threads N: the loop stays float32)",
    )
    cache.add_argument(
        "--copy-queue",
        action="store_true",
        help="prefetch uploads on a second stream of the GPU, with an event per slot that the routing's "
        "compute stream waits for, so the host never waits for a copy (devices without events: ignored)",
    )
    cache.add_argument(
        "--keep-late-predictions",
        action="store_true",
        help="prediction modes: keep predicting even when nearly every prediction arrives after the "
        "router (by default prediction then switches off and the cache runs as lru)",
    )
    cache.add_argument(
        "--wait-prefetch",
        action="store_true",
        help="the router waits for each layer's prediction and prefetch (slower; shows what the "
        "predictor achieves when it is never late)",
    )
    cache.add_argument(
        "--bypass-tokens",
        type=int,
        default=32,
        help="ubatches larger than this (prefill) use stock placement (default 32)",
    )


def cache_slots(args: argparse.Namespace, layout: MoeLayout) -> int:
    k = layout.n_expert_used
    if args.slots is not None:
        if not k <= args.slots <= layout.n_expert:
            raise UserError(
                f"--slots {args.slots} must be between the router's k = {k} and the "
                f"{layout.n_expert} experts of a layer"
            )
        return args.slots
    if args.vram_budget is not None:
        return plan_slots(
            layout, args.vram_budget, args.ctx_size or min(4096, layout.n_ctx_train)
        ).slots_per_layer
    return max(k, layout.n_expert // 4)  # about a quarter of each layer's experts


# Sampling field -> its flag (and the request field of `serve`, which is the field name)
SAMPLING_FLAGS = {
    "temperature": "--temp",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "repeat_penalty": "--repeat-penalty",
    "seed": "--seed",
}


def check_sampling(values: dict, names: dict[str, str] | None = None) -> None:
    """Sampling values as llama.cpp's samplers accept them; `values` holds Sampling's field names, and
    errors call them by `names` (default: the command-line flags)."""
    rules = {
        "temperature": (lambda v: v >= 0, "0 or more (0: greedy)"),
        "top_k": (lambda v: v >= 0, "0 or more (0: off)"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
        "min_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0: off)"),
        "repeat_penalty": (lambda v: v > 0, "positive (1: off)"),
        "seed": (
            lambda v: v == RANDOM_SEED or 0 <= v <= LLAMA_DEFAULT_SEED,
            f"{RANDOM_SEED} (random) or 0-{MAX_SEED}",
        ),
    }
    for name, value in values.items():
        ok, expected = rules[name]
        if not ok(value):  # NaN fails every comparison, so it is refused too
            raise UserError(f"{(names or SAMPLING_FLAGS)[name]} {value} must be {expected}")


def sampling_from(values: dict) -> Sampling:
    """A Sampling with a concrete seed: a random one is drawn here (not by llama.cpp), so it can be
    printed, and oracle mode's recorded run samples exactly what the cached run samples."""
    seed = random.SystemRandom().randint(0, MAX_SEED) if is_random_seed(values["seed"]) else values["seed"]
    return Sampling(**{**values, "seed": seed})


def is_random_seed(seed: int) -> bool:
    """-1, or llama.cpp's LLAMA_DEFAULT_SEED itself: draw a seed."""
    return seed in (RANDOM_SEED, LLAMA_DEFAULT_SEED)


def sampling_args(args: argparse.Namespace) -> dict:
    """The sampling flags' values under Sampling's field names."""
    return {name: getattr(args, flag[2:].replace("-", "_")) for name, flag in SAMPLING_FLAGS.items()}


def describe_sampling(sampling: Sampling, seed: str | None = None) -> str:
    """Greedy, or the sampler settings with the seed (or `seed`, words in its place)."""
    if sampling.temperature <= 0:
        return "greedy"
    return (
        f"sampled: temp {sampling.temperature:g}, top-k {sampling.top_k}, top-p {sampling.top_p:g}, "
        f"min-p {sampling.min_p:g}, repeat penalty {sampling.repeat_penalty:g}, "
        f"{seed or f'seed {sampling.seed}'}"
    )


@dataclasses.dataclass
class Setup:
    """What `run` and `serve` settle before loading the model: checked options, placement, predictors."""

    model: Path
    layout: MoeLayout
    llama_cpp: ModuleType
    config: EngineConfig
    predictors: object | None
    n_slots: int
    sampling: Sampling


@dataclasses.dataclass
class Loaded:
    """An engine with its expert cache (None: stock placement) and the slots the device granted."""

    engine: Engine
    runtime: CacheRuntime | None
    n_slots: int
    mode: str


@deferred()  # Ctrl-C: after it, never inside an import or initialization of onnxruntime, onnx, llama.cpp
def prepare(args: argparse.Namespace) -> Setup:
    """Check the shared options, resolve the default model, and load predictors and the library."""
    if args.n_predict <= 0:
        raise UserError(f"-n must be at least 1 (got {args.n_predict})")
    if args.bandwidth is not None and args.bandwidth <= 0:
        raise UserError("--bandwidth must be positive")
    if not 0 < args.target <= 1:
        raise UserError("--target is an expected recall: a number in (0, 1]")
    if args.extra < 0 or args.bypass_tokens < 1:
        raise UserError("--extra must be 0 or more and --bypass-tokens at least 1")
    check_sampling(sampling_args(args))
    if args.n_cpu_moe is not None and args.n_cpu_moe < 0:
        raise UserError(f"--n-cpu-moe {args.n_cpu_moe} is negative: give a number of layers")
    apply_default_model(args)
    if args.lookahead < 0 or (args.lookahead and args.mode not in PREDICTION_MODES):
        raise UserError(f"--lookahead needs a prediction mode ({', '.join(PREDICTION_MODES)}) and N >= 0")
    if not 0 <= args.predictor_threads <= 1024:
        raise UserError(f"--predictor-threads must be between 0 and 1024 (got {args.predictor_threads})")
    if args.residency == "token":
        if args.mode == "off" or args.miss == "auto":
            raise UserError(
                "--residency token needs a cache --mode, and computes misses by the host side: no --miss auto"
            )
        args.miss = "cpu"
    if args.predictor_device == "gpu":
        if args.mode not in PREDICTION_MODES or args.mode == "adaptive" or args.residency != "token":
            raise UserError(
                "--predictor-device gpu needs a prediction mode with a fixed number of experts (top1, exact, "
                "overprov) and --residency token"
            )
        if args.lookahead:
            raise UserError(
                "--predictor-device gpu predicts each layer from its own activation: drop --lookahead"
            )
    if args.predictor_fp16 and (
        args.mode not in PREDICTION_MODES
        or args.predictor_engine != "native"
        or (args.predictor_device != "gpu" and not args.predictor_threads)
    ):
        raise UserError(
            "--predictor-fp16 is for the library's predictors as graphs: add --predictor-device gpu (or "
            "--predictor-threads N) to a prediction mode"
        )
    if args.miss != "upload" and args.mode == "off":
        raise UserError(f"--miss {args.miss} needs the expert cache: choose a --mode (e.g. lru)")
    model = Path(args.model)
    layout = read_layout(model)
    overrides = tuple(parse_override(text) for text in args.override_tensor)
    if args.cpu_moe or args.mode != "off":
        overrides += expert_overrides(None)
    elif args.n_cpu_moe is not None:
        overrides += expert_overrides(min(args.n_cpu_moe, layout.n_layer))  # one pattern per layer
    predictors = None
    if args.mode in PREDICTION_MODES:
        if not args.predictors:
            raise UserError(f"--mode {args.mode} needs --predictors DIR (made by `edge-preattn train`)")
        from ..predictors.onnx_io import load_predictor_set

        predictors = load_predictor_set(Path(args.predictors), fingerprint=layout.routing_fingerprint)
        predictors.check_fits(layout)
        if args.lookahead and predictors.input == "x_prev":
            raise UserError(
                "--lookahead needs pre-attention predictors: these are cross-layer ones (trained on "
                "x_prev), which predict the next layer already"
            )
    n_slots = cache_slots(args, layout) if args.mode != "off" else 0
    llama_cpp = native.load_llama(
        native.find_library(args.preset, stock=args.stock),
        offload_short_batches=args.mode != "off" and args.miss == "upload",  # the CPU side stays there
    )
    config = EngineConfig(
        model_path=str(model),
        n_ctx=args.ctx_size,
        n_threads=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        overrides=overrides,
        use_extra_bufts=args.mode == "off",
    )
    sampling = sampling_from(sampling_args(args))
    return Setup(model, layout, llama_cpp, config, predictors, n_slots, sampling)


def cache_options(args: argparse.Namespace, setup: Setup, oracle: dict | None) -> CacheOptions:
    """`run`'s and `serve`'s cache flags as one object (`prepare` refused bad ones by their flag names
    before the model loaded); `n_slots` is the planned size, which `open_engine` may lower."""
    return CacheOptions(
        mode=args.mode,
        n_slots=setup.n_slots,
        max_batch_tokens=args.bypass_tokens,
        predictors=setup.predictors,
        extra=args.extra,
        target=args.target,
        bandwidth_bytes_per_s=args.bandwidth,
        eviction=args.eviction,
        oracle=oracle,
        miss=args.miss,
        wait_for_prefetch=args.wait_prefetch,
        lookahead=args.lookahead,
        late_fallback=not args.keep_late_predictions,
        predictor_engine=args.predictor_engine,
        predictor_threads=args.predictor_threads,
        predictor_device=args.predictor_device,
        predictor_fp16=args.predictor_fp16,
        copy_queue=args.copy_queue,
        residency=args.residency,
    )


@contextlib.contextmanager
def open_engine(
    args: argparse.Namespace, setup: Setup, record_oracle: Callable[[Engine], dict] | None = None
) -> Iterator[Loaded]:
    """The engine and, in a cache mode, its expert cache (fewer slots, or stock placement, when the
    device runs out of memory). `record_oracle(engine)` records the routing mode oracle prefetches."""
    with Engine(setup.llama_cpp, setup.config) as engine, contextlib.ExitStack() as stack:
        runtime, n_slots, mode = None, setup.n_slots, args.mode
        if mode != "off":
            oracle = record_oracle(engine) if mode == "oracle" and record_oracle else None
            options = cache_options(args, setup, oracle)
            with deferred():  # Ctrl-C: once the cache is built and entered, never halfway
                runtime, n_slots = shrink_until_allocated(  # out of device memory: fewer slots, or stock
                    lambda slots: CacheRuntime.for_layout(
                        engine, setup.layout, dataclasses.replace(options, n_slots=slots)
                    ),
                    n_slots,
                    setup.layout.n_expert_used,
                )
                if runtime is None:
                    mode = "off"
                else:
                    stack.enter_context(runtime)
        yield Loaded(engine, runtime, n_slots, mode)


def describe(setup: Setup, loaded: Loaded, args: argparse.Namespace) -> str:
    """The header line: model, build, mode, cache size and when residency is decided."""
    between_tokens = ", residency decided between tokens" if args.residency == "token" else ""
    return f"[{setup.model.name}] {loaded.engine.api.build_info()} · mode {loaded.mode}" + (
        f", {loaded.n_slots} slots per layer, misses: {args.miss}{between_tokens}" if loaded.runtime else ""
    )


def main(args: argparse.Namespace) -> int:
    if not args.prompt.strip():
        raise UserError("the prompt is empty: give some text with -p")
    setup = prepare(args)
    if args.stats_json:  # refused before the run: a missing folder, a device, the model itself
        output_target(Path(args.stats_json), inputs=(Path(args.model),))
    sampling = setup.sampling

    def record_oracle(engine: Engine) -> dict:
        return record_routing(engine, args.prompt, args.n_predict, sampling)

    with open_engine(args, setup, record_oracle) as loaded:
        record = None
        sys.stdout.write(args.prompt)
        for text, current in stream_text(
            loaded.engine, loaded.engine.generate(args.prompt, args.n_predict, sampling)
        ):
            sys.stdout.write(text)
            sys.stdout.flush()
            record = current
        sys.stdout.write("\n")
        stats = run_stats(record, loaded.engine, loaded.runtime)
        print(f"{describe(setup, loaded, args)} · {describe_sampling(sampling)}", file=sys.stderr)
        print(format_stats(stats), file=sys.stderr)
        if args.verbose and loaded.runtime:
            print(format_layers(loaded.runtime.controller.stats), file=sys.stderr)
    if args.stats_json:
        payload = {"model": str(setup.model), "mode": loaded.mode, "slots": loaded.n_slots}
        payload["sampling"] = dataclasses.asdict(sampling)
        write_json_atomic(Path(args.stats_json), {**payload, **stats})
    return 0
