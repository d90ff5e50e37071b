"""How much recall a prediction keeps when it is made layers ahead (issue 16's lead, issue 18's recipe).

On an H100 a layer's attention lasts about 0.03 ms while its predicted uploads take 0.06-0.2 ms
(bench/results/predictor-in-graph/): a prediction made at the layer's own pre-attention state starts
too late to hide them. A predictor of layer l that reads the pre-attention state of the MoE layer D
positions earlier (`train --lead D`) can start its uploads D layers ahead; with D as deep as the model
every layer is predicted from the first layer's state, when a token's forward pass starts, which is
where the oracle's uploads start (1.13-1.80x lru there). This trains the shipped recipe (residual on
the router prior, rank+distill, lr 3e-3, hidden 128) without prev-layer, which does not exist ahead,
at each lead, and scores every set on held-out traces beside the same-layer recipe with all three
history inputs and the baselines. Writes accuracy-lead-<name>.{json,md,png} under --results.

    nice -n 10 python bench/lead_study.py /work/ref/traces --heldout /work/ref/heldout \
        --runs /work/ref/runs-lead --name moe-ref-a --epochs 8 --patience 8

Nothing is chosen here: every row is reported, each with the epochs its validation loss chose.
"""

import argparse
import math
import sys
from pathlib import Path

from accuracy_ablation import (
    DISTILL,
    RECIPES,
    add_study_args,
    describe,
    heldout_scored,
    per_layer_recall,
    trained,
)

from edge_preattn.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from edge_preattn.predictors import evaluate
from edge_preattn.traces.trace_set import TraceSet

FROM_FIRST = 1024  # a lead deeper than any model's MoE layers: every layer read from the first one
LEADS = (0, 1, 2, 4, FROM_FIRST)
LEAD_BASE = {**DISTILL, "features": "prev-token,prev-x", "lr": 3e-3}
SAME_LAYER = "shipped-all3@lr3e-3"  # the shipped recipe with prev-layer: what a lead gives up


def lead_name(lead: int) -> str:
    return "from-first" if lead == FROM_FIRST else f"lead{lead}"


def lead_recipes() -> dict[str, dict]:
    return {f"{lead_name(lead)}-ptx": {**LEAD_BASE, "lead": lead} for lead in LEADS}


def markdown(payload: dict) -> str:
    k, layers, methods = payload["k"], payload["moe_layers"], payload["methods"]
    half = str(math.ceil(k / 2))
    lines = [
        f"# Prediction made layers ahead: {payload['model']}",
        "",
        f"Held-out: {heldout_scored(payload)} ({payload['train_tokens']} training tokens); k = {k} of "
        f"{payload['n_expert']}. Percent. "
        "lead D: each layer's predictor reads the pre-attention state of the MoE layer D positions "
        "earlier (the first layer's where there is none that far back); from-first: every layer from "
        "the first layer's state. -ptx: prev-token and prev-x inputs (the previous token's routing and "
        "pre-attention state at the predicted layer), no prev-layer (not known ahead).",
        "",
        f"| row | lead | recall@{k} | decode recall@{k} | recall@{k}+{half} | top-1 | exact-set |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [*payload["recipes"], "router-prior", "prev-token", "lru-16", "lru-32"]
    for name in rows:
        if name not in methods:
            continue
        mean = methods[name]["mean"]
        decode = methods[name]["subsets"].get("decode", methods[name])["mean"]
        lead = payload["recipes"].get(name, {}).get("settings", {}).get("lead", "")
        lead = "first" if lead == FROM_FIRST else lead
        cells = [
            str(lead),
            f"{100 * mean['recall_at_k']:.2f}",
            f"{100 * decode['recall_at_k']:.2f}",
            f"{100 * mean['recall_at_k_plus_m'][half]:.2f}",
            f"{100 * mean['top1']:.2f}",
            f"{100 * mean['exact_set']:.2f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## held-out recall@{k} per layer",
        "",
        *per_layer_recall("row", methods, [n for n in rows if n in methods], layers),
        "",
        "lru-C rows: an LRU cache of C slots per layer (cleared at each prompt): recall columns hold its "
        "hit rate. router-prior: the layer's own router on its own pre-attention state, no training.",
        *payload.get("notes", []),
    ]
    return "\n".join(lines) + "\n"


def png(payload: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, methods = payload["moe_layers"], payload["methods"]
    figure, axis = plt.subplots(figsize=(7, 4))
    for name in [*payload["recipes"], "lru-16"]:
        axis.plot(
            layers, [100 * v for v in methods[name]["per_layer"]["recall_at_k"]], marker="o", label=name
        )
    axis.set_xlabel("MoE layer")
    axis.set_ylabel(f"held-out recall@{payload['k']} (%)")
    axis.set_title(f"{payload['model']}: prediction made layers ahead")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_args(parser)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--patience", type=int, default=8)
    parser.add_argument(
        "--train", nargs="+", metavar="ROW", help="train only these rows and write nothing (parallel runs)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    recipes = {SAME_LAYER: RECIPES[SAME_LAYER], **lead_recipes()}
    if args.train:
        for name in args.train:
            trained(args, name, recipes[name])
        return 0
    manifests = {name: trained(args, name, recipe) for name, recipe in recipes.items()}
    traces, heldout = TraceSet(Path(args.traces)), TraceSet(Path(args.heldout))
    sets = {name: evaluate.load_set(Path(args.runs) / name, traces.fingerprint) for name in manifests}
    payload = evaluate.evaluate(traces, sets, args.name, heldout, evaluate.prior_weights(traces, None, sets))
    payload["recipes"] = {name: describe(m) for name, m in manifests.items()}
    payload["train_tokens"] = next(iter(manifests.values()))["train_tokens"]
    payload["notes"] = [
        f"Every set: {args.epochs} epochs, patience {args.patience}, seed 0 (the same validation prompts), "
        f"{args.threads} torch thread(s) on this machine's CPU.",
        *args.note,
    ]
    path = Path(args.results) / f"accuracy-lead-{args.name}.json"
    write_json_atomic(path, payload)
    write_text_atomic(path.with_suffix(".md"), markdown(payload))
    write_bytes_atomic(path.with_suffix(".png"), png(payload))
    print(markdown(payload))
    print(f"wrote {path} (.md, .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
