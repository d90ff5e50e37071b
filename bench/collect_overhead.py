"""Collection cost: time of `collect` ÷ time of plain generation of the same tokens, same prompts.

Writes bench/results/collect-overhead-<model>-<cpu|gpu>.json and .md. Run from the repo root:
    python bench/collect_overhead.py ../shared/models/moe-ref-a.gguf ../shared/prompts/train.txt \\
        --prompts-limit 64
"""

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edge_preattn import collect, native
from edge_preattn.engine import Engine, EngineConfig, Sampling
from edge_preattn.files import write_json_atomic, write_text_atomic


def plain_generation_seconds(
    model: Path, prompts: list[str], settings: collect.CollectSettings
) -> tuple[float, int]:
    """Prefill + sampled decode of each prompt, no hooks: what a user's run costs."""
    engine = Engine(
        native.load_llama(), EngineConfig(str(model), n_ctx=settings.n_ctx, use_extra_bufts=False)
    )
    tokens = 0
    started = time.perf_counter()
    for index, prompt in enumerate(prompts):
        sampling = Sampling(
            temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed + index
        )
        prompt_tokens = engine.tokenize(prompt)[: settings.n_ctx - settings.max_new_tokens]
        generated = list(engine.generate(prompt_tokens, settings.max_new_tokens, sampling))
        tokens += len(prompt_tokens) + len(generated) - 1
    seconds = time.perf_counter() - started
    engine.close()
    return seconds, tokens


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("prompts", type=Path)
    parser.add_argument("--prompts-limit", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    prompts = collect.read_prompts(args.prompts)[: args.prompts_limit]
    subset = Path(tempfile.mkdtemp()) / "prompts.txt"
    subset.write_text("\n".join(p.replace("\n", "\\n") for p in prompts) + "\n")
    settings = collect.CollectSettings(max_new_tokens=args.max_new_tokens)
    plain_s, plain_tokens = plain_generation_seconds(args.model, prompts, settings)
    out_dir = Path(tempfile.mkdtemp()) / "traces"
    started = time.perf_counter()
    manifest = collect.collect(args.model, subset, out_dir, settings, progress=False)
    collect_s = time.perf_counter() - started
    disk = sum(f.stat().st_size for f in out_dir.rglob("*.npy"))
    shutil.rmtree(out_dir.parent)
    api = native.NativeApi(native.load_llama())
    result = {
        "model": args.model.name,
        "build": api.build_info(),
        "machine": {"cpu": platform.processor() or platform.machine(), "host": platform.node()},
        "command": " ".join(sys.argv),
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "plain_seconds": round(plain_s, 2),
        "plain_tokens": plain_tokens,
        "collect_seconds": round(collect_s, 2),
        "collected_tokens": manifest["totals"]["tokens"],
        "samples_per_s": round(manifest["totals"]["tokens"] / collect_s, 1),
        "disk_bytes": disk,
        "ratio": round(collect_s / plain_s, 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"collect-overhead-{args.model.stem}-{'gpu' if api.gpus() else 'cpu'}"
    write_json_atomic(args.out / f"{stem}.json", result)
    table = (
        "| "
        + " | ".join(result)
        + " |\n|"
        + "---|" * len(result)
        + "\n| "
        + " | ".join(str(v) for v in result.values())
        + " |\n"
    )
    write_text_atomic(args.out / f"{stem}.md", table)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
