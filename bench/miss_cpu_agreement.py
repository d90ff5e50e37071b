"""`--miss cpu` and `--miss auto` against stock llama.cpp: greedy agreement and perplexity difference.

Stock runs in its own process on the unpatched build (`edge-preattn build --stock`), so the
reference is llama.cpp itself, not our library with the cache off. References: stock with every
routed expert in host RAM (`-ot exps=CPU`, unrepacked weights: the bytes our host side reads) and,
on a GPU build, stock with every layer on the GPU. On the CPU build every expert is computed by the
same CPU kernels either way, so agreement must be 100% and the logits equal; on CUDA the CPU-computed
experts round differently from the GPU ones, so agreement and the perplexity difference are what
there is to report.

Per model and configuration: greedy generation from each prompt (free running; agreement is the
share of positions whose token equals the reference's, and where the first difference falls), and
teacher forcing over the prompts' own text fed one token per decode, so every token reads the cache
(top-1 agreement, perplexity, and whether the logits are bit-identical).

    python bench/miss_cpu_agreement.py                      # moe-ref-a, synth:tiny, synth:tiny-deepseek2
    python bench/miss_cpu_agreement.py --preset cuda-hopper --tag gpu
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from edge_preattn import native
from edge_preattn.files import write_json_atomic, write_text_atomic

CONFIGS = {  # name -> (stock library, experts in host RAM, cache mode, miss policy)
    "stock-gpu": (True, False, None, None),
    "stock-cpu-moe": (True, True, None, None),
    "miss-cpu-lru": (False, True, "lru", "cpu"),
    "miss-cpu-exact": (False, True, "exact", "cpu"),
    "miss-auto-lru": (False, True, "lru", "auto"),
}
SHARED = Path(__file__).resolve().parents[2] / "shared"
FALLBACK_PROMPTS = [
    "def fibonacci(n):",
    "import numpy as np\n\ndef softmax(x):",
    "The three primary colors are",
    "Plan a three-day itinerary for a first visit to Rome.",
    "Whales are mammals, which means that",
    "Convert 72 degrees Fahrenheit to Celsius and show the calculation.",
    "class Stack:\n    def __init__(self):",
    "Write a haiku about autumn rain.",
    "SELECT name, COUNT(*) FROM orders",
    "The capital of Australia is",
    "for i in range(10):",
    "Explain why the sky is blue in two sentences.",
    "#include <stdio.h>\n\nint main(void) {",
    "Once upon a time, in a small village,",
    "def quicksort(xs):",
    "A list of prime numbers: 2, 3, 5,",
]


def model_path(spec: str, work: Path) -> Path:
    """A GGUF path, or `synth:<preset>` (written once into `work`)."""
    if not spec.startswith("synth:"):
        return Path(spec)
    from edge_preattn.synth import write_synthetic

    path = work / f"{spec[6:]}.gguf"
    if not path.is_file():
        write_synthetic(spec[6:], path, progress=False)
    return path


def worker(args: argparse.Namespace) -> int:
    """One configuration in this process (its library is fixed by EDGE_PREATTN_LIB): write arrays."""
    from edge_preattn.controller import CacheRuntime, RandomRanking
    from edge_preattn.engine import Engine, EngineConfig, Sampling
    from edge_preattn.layout import read_layout

    _, host, mode, miss = CONFIGS[args.worker]
    prompts = json.loads(Path(args.prompts_json).read_text())
    llama_cpp = native.load_llama(native.find_library())
    layout = read_layout(args.model)
    config = EngineConfig.host_experts(args.model, args.ctx, host=host)
    generated, forced_logits, forced_targets = [], [], []
    with Engine(llama_cpp, config) as engine:
        runtime = None
        if mode is not None:
            options = {"predictors": RandomRanking(layout.n_expert)} if mode == "exact" else {}
            runtime = CacheRuntime.for_layout(
                engine, layout, n_slots=args.slots or layout.n_expert_used, mode=mode, miss=miss, **options
            )
        try:
            for prompt in prompts:
                tokens = [t for t, _ in engine.generate(prompt, args.n_predict, Sampling())]
                generated.append(tokens + [-1] * (args.n_predict - len(tokens)))  # -1: stopped early
            for prompt in prompts:
                tokens = engine.tokenize(prompt)
                engine.reset()
                for position, token in enumerate(tokens[:-1]):
                    engine.decode([token])
                    forced_logits.append(engine.last_logits())
                    forced_targets.append(tokens[position + 1])
            stats = runtime.controller.stats.totals() if runtime else None
            cpu_rows = runtime.bank.miss_stats().cpu_rows if runtime else 0
        finally:
            if runtime is not None:
                runtime.close()
    np.savez(
        args.out_npz,
        generated=np.array(generated, np.int64),
        logits=np.stack(forced_logits),
        targets=np.array(forced_targets, np.int64),
        cpu_rows=np.array(cpu_rows),
        hits=np.array(stats.hits if stats else 0),
        misses=np.array(stats.misses if stats else 0),
        build_info=np.array(native.NativeApi(llama_cpp).build_info()),
    )
    return 0


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under float64 log-softmax."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(targets)), targets]


def compare(run: dict, ref: dict) -> dict:
    gen, ref_gen = run["generated"], ref["generated"]
    valid = (gen >= 0) & (ref_gen >= 0)
    first = [
        int(np.argmax(row != ref_row)) if (row != ref_row).any() else len(row)
        for row, ref_row in zip(gen, ref_gen, strict=True)
    ]
    ppl, ref_ppl = (
        float(np.exp(nll(run["logits"], run["targets"]).mean())),
        float(np.exp(nll(ref["logits"], ref["targets"]).mean())),
    )
    return {
        "greedy_tokens": int(valid.sum()),
        "greedy_agreement": round(float((gen == ref_gen)[valid].mean()), 6),
        "first_difference_mean": round(float(np.mean(first)), 2),
        "forced_tokens": len(run["targets"]),
        "forced_top1_agreement": round(float((run["logits"].argmax(1) == ref["logits"].argmax(1)).mean()), 6),
        "perplexity": round(ppl, 6),
        "reference_perplexity": round(ref_ppl, 6),
        "perplexity_difference_relative": round(ppl / ref_ppl - 1, 9),
        "logits_bit_identical": bool(np.array_equal(run["logits"], ref["logits"])),
        "max_abs_logit_difference": float(np.abs(run["logits"] - ref["logits"]).max()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=f"{SHARED}/models/moe-ref-a.gguf,synth:tiny,synth:tiny-deepseek2")
    parser.add_argument("--prompts", type=Path, default=SHARED / "prompts" / "train.txt")
    parser.add_argument("--n-prompts", type=int, default=16, help="evenly spaced prompts of the file")
    parser.add_argument("-n", "--n-predict", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--slots", type=int, default=0, help="slots per layer (default: the router's k)")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--preset", default=os.environ.get("EDGE_PREATTN_PRESET", "cpu"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu", help="file name suffix (cpu, gpu)")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-json", help=argparse.SUPPRESS)
    parser.add_argument("--out-npz", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    if args.prompts.is_file():
        lines = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    else:  # the GPU machine has no ../shared
        print(f"{args.prompts} not found: using {len(FALLBACK_PROMPTS)} built-in prompts", file=sys.stderr)
        lines = FALLBACK_PROMPTS
    step = max(1, len(lines) // args.n_prompts)
    prompts = lines[step // 2 :: step][: args.n_prompts]
    libs = {stock: native.find_library(args.preset, stock=stock) for stock in (True, False)}
    gpu = args.preset != "cpu"
    configs = [name for name in CONFIGS if gpu or name != "stock-gpu"]
    results = {"preset": args.preset, "prompts": len(prompts), "n_predict": args.n_predict, "models": {}}
    with tempfile.TemporaryDirectory(prefix="miss-agreement-") as tmp:
        work = Path(tmp)
        (work / "prompts.json").write_text(json.dumps(prompts))
        for spec in args.models.split(","):
            model = model_path(spec, work)
            if not model.is_file():
                print(f"skipping {spec}: not found", file=sys.stderr)
                continue
            runs = {}
            for name in configs:
                out = work / f"{model.stem}-{name}.npz"
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    name,
                    "--model",
                    str(model),
                    "--out-npz",
                    str(out),
                ]
                command += ["--prompts-json", str(work / "prompts.json"), "-n", str(args.n_predict)]
                command += ["--slots", str(args.slots), "--ctx", str(args.ctx)]
                env = dict(os.environ, EDGE_PREATTN_LIB=str(libs[CONFIGS[name][0]]))
                subprocess.run(command, env=env, check=True)
                with np.load(out) as data:
                    runs[name] = {key: data[key] for key in data.files}
                print(f"{model.stem} {name}: done", file=sys.stderr)
            rows = {}
            for name in configs:
                if CONFIGS[name][2] is None:
                    continue
                rows[name] = {
                    "cpu_computed_rows": int(runs[name]["cpu_rows"]),
                    "build": str(runs[name]["build_info"]),
                    "vs_stock_cpu_moe": compare(runs[name], runs["stock-cpu-moe"]),
                }
                if gpu:
                    rows[name]["vs_stock_gpu"] = compare(runs[name], runs["stock-gpu"])
            results["models"][model.name] = {
                "stock_build": str(runs["stock-cpu-moe"]["build_info"]),
                "configs": rows,
            }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"miss-cpu-agreement-{args.tag}.json", results)
    write_text_atomic(args.out / f"miss-cpu-agreement-{args.tag}.md", markdown(results))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [
        f"# `--miss cpu|auto` vs stock llama.cpp ({results['preset']} build)",
        "",
        f"{results['prompts']} prompts × {results['n_predict']} greedy tokens; teacher forcing over the "
        "prompts' text one token per decode. Slots = the router's k (most experts miss).",
        "",
        "| model | config | vs | greedy tokens | greedy agreement | forced tokens | top-1 agreement | "
        "perplexity | Δ perplexity | logits equal | CPU-computed rows |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for model, entry in results["models"].items():
        for name, row in entry["configs"].items():
            for ref in ("vs_stock_cpu_moe", "vs_stock_gpu"):
                if ref not in row:
                    continue
                c = row[ref]
                lines.append(
                    f"| {model} | {name} | {ref[3:]} | {c['greedy_tokens']} | {c['greedy_agreement']:.2%} | "
                    f"{c['forced_tokens']} | {c['forced_top1_agreement']:.2%} | {c['perplexity']:.4f} | "
                    f"{c['perplexity_difference_relative']:+.2e} | "
                    f"{'yes' if c['logits_bit_identical'] else 'no'} | {row['cpu_computed_rows']} |"
                )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
