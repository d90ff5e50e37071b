"""How well a layer's pre-attention predictor does when it reads an earlier layer's activation.

Lookahead (`run --lookahead N`) predicts layer l+d's experts at layer l's pre-attention hook, by feeding
x_pre of layer l to layer l+d's own predictor: a whole layer (or d) earlier than the layer's own
prediction, which on a fast GPU arrives after the router (bench/results/gpu-2026-11-29b). The residual
stream changes little across a layer, so this should lose some recall, not all of it: this script
measures how much, on the held-out prompts of the predictors' manifest, beside the LRU hit rate.
Writes bench/results/lookahead-accuracy-<model>.{json,md}.

    python bench/lookahead_accuracy.py /tmp/traces-ref .carry/preds --max-distance 2
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from edge_preattn import baselines, metrics
from edge_preattn.evaluate import load_set, ranked_by, validation_prompts
from edge_preattn.files import write_json_atomic, write_text_atomic
from edge_preattn.traces import TraceSet


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("traces", type=Path)
    parser.add_argument("predictors", type=Path)
    parser.add_argument("--max-distance", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    traces = TraceSet(args.traces)
    pset = load_set(args.predictors, traces.fingerprint)
    held_out = np.isin(traces.meta()["prompt"], validation_prompts(pset.manifest))
    prompt = traces.meta()["prompt"][held_out]
    k, layers = traces.k, traces.layers
    margin = -(-k // 2)
    x = {il: traces.layer(il, "x_pre")[held_out] for il in layers}
    ids = {il: traces.layer(il, "ids")[held_out].astype(np.int64) for il in layers}
    rows = []
    for il in layers:
        row = {
            "layer": il,
            "lru_2k_hit_rate": float(baselines.lru(ids[il], prompt, 2 * k)["recall_at_k"].mean()),
        }
        for distance in range(args.max_distance + 1):
            source = il - distance
            if source not in x:
                continue
            order = ranked_by(pset, il, x[source], k + margin)
            row[f"d{distance}"] = {
                "recall_at_k": float(metrics.recall_at_k(order, ids[il]).mean()),
                f"recall_at_k_plus_{margin}": float(
                    metrics.recall_at_k_plus_m(order, ids[il], margin).mean()
                ),
                "top1": float(metrics.top1(order, ids[il]).mean()),
            }
        rows.append(row)
        print(row, flush=True)
    result = {
        "model": pset.manifest.get("model_name"),
        "traces": str(args.traces),
        "predictors": str(args.predictors),
        "heldout_tokens": int(held_out.sum()),
        "k": k,
        "command": " ".join(["python", *sys.argv]),
        "layers": rows,
    }
    name = Path(str(result["model"])).stem
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / f"lookahead-accuracy-{name}.json", result)
    lines = [
        f"# Lookahead accuracy, {result['model']} ({result['heldout_tokens']} held-out tokens, k = {k})",
        "",
        "Layer l+d's own pre-attention predictor fed x_pre of layer l (d = 0: the layer's own prediction).",
        "",
        "| layer | "
        + " | ".join(f"d={d} recall@k | d={d} recall@k+{margin}" for d in range(args.max_distance + 1))
        + " | LRU 2k hit rate |",
        "|---:|" + "---:|" * (2 * (args.max_distance + 1) + 1),
    ]
    for row in rows:
        cells = []
        for d in range(args.max_distance + 1):
            entry = row.get(f"d{d}")
            cells += (
                [f"{entry['recall_at_k']:.3f}", f"{entry[f'recall_at_k_plus_{margin}']:.3f}"]
                if entry
                else ["–", "–"]
            )
        lines.append(f"| {row['layer']} | " + " | ".join(cells) + f" | {row['lru_2k_hit_rate']:.3f} |")
    lines += ["", f"Command: `{result['command']}`", ""]
    write_text_atomic(args.out / f"lookahead-accuracy-{name}.md", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
