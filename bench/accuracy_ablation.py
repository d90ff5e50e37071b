"""Issue 18's ablation: what each part of the predictor recipe gains, on separately collected held-out
prompts, and what the predictors cost in size.

Every recipe is trained on the training traces with seed 0 (so all hold out the same validation
prompts, which choose the epoch and the winner: nothing is selected on the held-out traces), then
all are scored together by `evaluate.evaluate(..., heldout=...)` on every prompt of the held-out
traces, beside the baselines (router-prior, popularity from the training prompts, prev-token, LRU,
oracle). Writes, under --results:

- accuracy-ablation-<name>.{json,md}: the evaluate payload (schema `k`, `methods` → `mean` /
  `per_layer` → `recall_at_k`, `exact_set`, `top1`, `recall_at_k_plus_m`, `cover_at_k_plus_m`) plus
  `recipes` (settings, parameters, bytes, validation recall, train seconds, fp16/int8 recall) and
  `size_qwen3_30b` (the analytical size of each recipe for d = 2048, E = 128, 48 layers);
- accuracy-<name>.{json,md,png}: the same evaluation for the paper's recipe, the cross-layer one, the
  winner and the baselines (the file other tools read).

With --size (issue 18 item 5) it writes accuracy-size-<name>.{json,md,png} instead: --size-base (default
the shipped recipe) at hidden widths 8-1024 and at hidden 128 with a low-rank first Linear (ranks 8-64),
every set as its fp32, fp16 and int8 files, all scored on the held-out traces; each row's size at the
Qwen3-30B-A3B shape with and without the router prior; and the set chosen on validation recall within
2 % of 6 GiB, with its held-out cost against the best row.

With --push it writes accuracy-push-<name>.{json,md}: what else raises recall beyond the shipped recipe,
one change at a time (PUSH_RECIPES: all three history inputs, 16, 24 or 40 epochs with patience 3, either
loss alone, lr 3e-3), then hidden 256 with the features chosen, then every axis's chosen variant
together (also at hidden 128); every choice on the training traces' validation prompts, which are
scored beside the held-out ones.

Runs resume (each is an `edge-preattn train` folder under --runs). Example (2 cores, nice):
    nice -n 10 python bench/accuracy_ablation.py /work/traces-pred/ref-train \
        --heldout /work/traces-pred/ref-heldout --runs /work/traces-pred/runs --name moe-ref-a
The shipped recipe (`shipped-all3@lr3e-3`, and its cross-layer twin) is not in the default list: name it
with --recipes, with --epochs/--patience for the data size, e.g. on 1.6M tokens of moe-ref-a
(accuracy-ablation-moe-ref-a-1m.md): --recipes shipped-all3@lr3e-3 cross-layer-shipped-all3@lr3e-3
--sizes --size-base shipped-all3@lr3e-3 --epochs 8 --patience 8.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from edge_preattn.files import write_json_atomic, write_text_atomic
from edge_preattn.predictors import eval_report, evaluate, features, onnx_io
from edge_preattn.predictors.train import TrainSettings, train
from edge_preattn.traces.trace_set import TraceSet

QWEN3_30B = {"n_embd": 2048, "n_expert": 128, "n_layer": 48}
BUDGET_BYTES = 0.02 * 6 * 2**30  # 2 % of a 6 GiB card
PAPER = {"arch": 2, "hidden": 2048, "loss": "rank", "prior": False}
PRIOR = {"arch": 2, "hidden": 128, "loss": "rank", "prior": True}
DISTILL = {**PRIOR, "loss": "rank+distill"}
BOTH = "prev-layer,prev-token"
# cheap ones first: a run cut short still has them; the paper's hidden 2048 (≈ 10x the compute of
# hidden 128) is left to --recipes paper-h2048
RECIPES: dict[str, dict] = {
    "paper-h128": {**PAPER, "hidden": 128},
    "prior-h128": PRIOR,
    "prior-h128+distill": DISTILL,
    "prior-h128+distill+prev-layer": {**DISTILL, "features": "prev-layer"},
    "prior-h128+distill+prev-token": {**DISTILL, "features": "prev-token"},
    "prior-h128+distill+prev-x": {**DISTILL, "features": "prev-x"},
    "prior-h128+distill+both": {**DISTILL, "features": BOTH},
    "cross-layer-prior-h128+distill": {**DISTILL, "input": "x_prev"},
    "cross-layer-prior-h128+distill+both": {**DISTILL, "features": BOTH, "input": "x_prev"},
    "paper-h2048": PAPER,
}
ALL3 = "prev-layer,prev-token,prev-x"
# the recipe of the shipped predictors (bench/default_model/predictors.sh; chosen by --push on the
# packaged model) less its epochs and patience, which come from --epochs/--patience: on other data
# sizes the number of passes is what changes; and its cross-layer twin
SHIPPED_ALL3 = {**DISTILL, "features": ALL3, "lr": 3e-3}
RECIPES["shipped-all3@lr3e-3"] = SHIPPED_ALL3
RECIPES["cross-layer-shipped-all3@lr3e-3"] = {**SHIPPED_ALL3, "input": "x_prev"}
RECIPES["shipped-all3@lr3e-3-h256"] = {**SHIPPED_ALL3, "hidden": 256}  # more width where data is plenty
# thirteenth session: prev-layer adds nothing at either data size (accuracy-lead-*.md); the previous
# token's router input at the layer (prev-router) in its place
RECIPES["shipped-ptx@lr3e-3"] = {**SHIPPED_ALL3, "features": "prev-token,prev-x"}
RECIPES["shipped-ptx+router@lr3e-3"] = {**SHIPPED_ALL3, "features": "prev-token,prev-x,prev-router"}
# fourteenth session: both of the twelfth and thirteenth sessions' gains on moe-ref-a at 1M tokens together
RECIPES["shipped-ptx+router@lr3e-3-h256"] = {**RECIPES["shipped-ptx+router@lr3e-3"], "hidden": 256}
RECIPES["cross-layer-shipped-ptx+router@lr3e-3-h256"] = {
    **RECIPES["shipped-ptx+router@lr3e-3-h256"],
    "input": "x_prev",
}
DEFAULT_RECIPES = [name for name in RECIPES if name != "paper-h2048" and "shipped" not in name]
# --push: what else raises recall beyond the shipped recipe (BOTH), each change on its own
SHIPPED = {**DISTILL, "features": BOTH}
PUSH_RECIPES: dict[str, dict] = {
    "prior-h128+distill+both": SHIPPED,
    "prior-h128+distill+all3": {**SHIPPED, "features": ALL3},
    "prior-h128+distill+both@e16p3": {**SHIPPED, "epochs": 16, "patience": 3},
    "prior-h128+distill+both@e24p3": {**SHIPPED, "epochs": 24, "patience": 3},
    "prior-h128+distill+both@e40p3": {**SHIPPED, "epochs": 40, "patience": 3},
    "prior-h128+distill-only+both": {**SHIPPED, "loss": "distill"},
    "prior-h128+rank-only+both": {**SHIPPED, "loss": "rank"},
    "prior-h128+distill+both@lr3e-3": {**SHIPPED, "lr": 3e-3},
}
RECIPES |= {name: recipe for name, recipe in PUSH_RECIPES.items() if name not in RECIPES}
# each axis: {variant: the PUSH_RECIPES row that measures it}; the first is the shipped setting. Hidden
# 256 is measured with the features chosen on validation, then the best variant of every axis together.
PUSH_AXES = {
    "features": {"both": "prior-h128+distill+both", "all3": "prior-h128+distill+all3"},
    "epochs": {
        "e8p2": "prior-h128+distill+both",
        "e16p3": "prior-h128+distill+both@e16p3",
        "e24p3": "prior-h128+distill+both@e24p3",
        "e40p3": "prior-h128+distill+both@e40p3",
    },
    "loss": {
        "rank+distill": "prior-h128+distill+both",
        "distill": "prior-h128+distill-only+both",
        "rank": "prior-h128+rank-only+both",
    },
    "lr": {"1e-3": "prior-h128+distill+both", "3e-3": "prior-h128+distill+both@lr3e-3"},
}
SIZES = (64, 256)  # hidden widths also tried for the winning recipe (128 is in RECIPES)
# --size: the shipped recipe at these hidden widths, and at hidden 128 with these ranks of the first Linear
SIZE_BASE = "prior-h128+distill+both"
SIZE_HIDDEN = (8, 16, 32, 64, 128, 256, 512, 1024)
SIZE_RANKS = (8, 16, 32, 64)
FORMATS = ("fp32", "fp16", "int8")
GAINS = {  # row: (what it adds, the row it is compared with)
    "prior-h128": ("router prior (residual)", "paper-h128"),
    "prior-h128+distill": ("distill loss", "prior-h128"),
    "prior-h128+distill+prev-layer": ("prev-layer input", "prior-h128+distill"),
    "prior-h128+distill+prev-token": ("prev-token input", "prior-h128+distill"),
    "prior-h128+distill+prev-x": ("prev-x input", "prior-h128+distill"),
    "prior-h128+distill+both": ("prev-layer + prev-token", "prior-h128+distill"),
    "paper-h128": ("hidden 2048 → 128", "paper-h2048"),
}


def settings_for(recipe: dict, epochs: int, patience: int) -> TrainSettings:
    return TrainSettings(**{"epochs": epochs, "patience": patience, **recipe})


def parameters(recipe: dict, n_embd: int, n_expert: int) -> dict[str, int]:
    """The recipe's numbers per layer at another model's shape, by part (networks.parameter_formula,
    which tests/test_predictors.py checks against the real module's count)."""
    from edge_preattn.predictors.networks import parameter_formula

    n_extra = sum(features.width(f, n_embd, n_expert) for f in features.parse(recipe.get("features")))
    return parameter_formula(
        recipe["arch"],
        n_embd,
        n_expert,
        recipe["hidden"],
        n_extra=n_extra,
        prior=bool(recipe.get("prior")),
        rank=recipe.get("rank", 0),
    )


def qwen3_size(recipe: dict) -> dict:
    """Bytes of the recipe's set at the Qwen3-30B-A3B shape, as today's files store it (fp32; fp16:
    every number in float16; int8: the two weight matrices in int8, everything else, the router prior
    included, in float32 as onnx_io.quantize_layer writes it) and without the router prior's E·d
    numbers (`*_mib_without_prior`): they are the model's own ffn_gate_inp weights, which a predictor
    on the GPU can read where the model keeps them. ONNX framing (a few KiB per file) is left out."""
    n_layer = QWEN3_30B["n_layer"]
    parts = parameters(recipe, QWEN3_30B["n_embd"], QWEN3_30B["n_expert"])
    per_layer = parts["total"]
    sizes = {"parameters_per_layer": per_layer, "parameters": per_layer * n_layer}
    prior = (parts["prior"] - 1) * n_layer if recipe.get("prior") else 0  # E·d; the scale (1) stays
    matrices = (
        parts["first"] - recipe["hidden"] - recipe.get("rank", 0) + parts["second"] - QWEN3_30B["n_expert"]
    ) * n_layer
    total = per_layer * n_layer
    sizes["parameters_without_prior"] = total - prior
    for form, width in (("fp32", 4), ("fp16", 2), ("int8", 1)):
        # int8: the matrices in int8; biases, norm statistics, scale and prior in float32
        size_bytes = matrices + (total - matrices) * 4 if form == "int8" else total * width
        without = size_bytes - prior * (4 if form == "int8" else width)
        sizes[f"{form}_mib"] = round(size_bytes / 2**20, 2)
        sizes[f"{form}_within_2pct_of_6gib"] = size_bytes <= BUDGET_BYTES
        sizes[f"{form}_mib_without_prior"] = round(without / 2**20, 2)
        sizes[f"{form}_without_prior_within_2pct_of_6gib"] = without <= BUDGET_BYTES
    return sizes


def trained(args, name: str, recipe: dict, formats: bool = False) -> dict:
    directory = Path(args.runs) / name
    settings = settings_for(recipe, args.epochs, args.patience)
    manifest_path = directory / onnx_io.MANIFEST
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if not formats or manifest["settings"].get("fp16"):
            return manifest
    started = time.monotonic()
    print(f"[ablation] training {name}", flush=True)
    manifest = train(
        Path(args.traces), directory, settings, int8=formats, fp16=formats, progress=args.progress
    )
    print(f"[ablation] {name}: val recall@k {mean_val(manifest):.4f} ({time.monotonic() - started:.0f}s)")
    return manifest


def mean_val(manifest: dict) -> float:
    return float(np.mean([e["validation"]["best_recall_at_k"] for e in manifest["predictors"]]))


def describe(manifest: dict) -> dict:
    entries = manifest["predictors"]
    row = {
        "settings": manifest["settings"],
        "parameters_per_layer": entries[0].get("parameters"),
        "bytes_per_layer": entries[0].get("bytes"),
        "val_recall_at_k": mean_val(manifest),
        "epochs_run": [len(e["validation"]["recall_at_k_per_epoch"]) for e in entries],
        "train_seconds": sum(sum(e["validation"]["seconds_per_epoch"]) for e in entries),
        "train_tokens": manifest["train_tokens"],
    }
    for form in ("fp16", "int8"):
        if form in entries[0]:
            row[form] = {
                "bytes_per_layer": entries[0][form]["bytes"],
                "val_recall_at_k": float(np.mean([e[form]["val_recall_at_k"] for e in entries])),
                "fp32_val_recall_at_k": float(np.mean([e[form]["fp32_val_recall_at_k"] for e in entries])),
            }
    return row


def per_layer_recall(label: str, methods: dict, names, layers) -> list[str]:
    """A markdown table of recall@k per layer (percent), one row per name of `methods`."""
    lines = [
        "| " + label + " | " + " | ".join(f"L{il}" for il in layers) + " |",
        "|---" * (len(layers) + 1) + "|",
    ]
    for name in names:
        per_layer = methods[name]["per_layer"]["recall_at_k"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.2f}" for v in per_layer) + " |")
    return lines


def heldout_scored(payload: dict) -> str:
    """What an evaluate payload scored on held-out traces and what it trained on, for a report's text."""
    phases = payload["heldout_tokens_by_phase"]
    return (
        f"{payload['heldout_tokens']} tokens ({phases['prefill']} prefill, {phases['decode']} decode) of "
        f"{len(payload['heldout_prompts'])} prompts collected separately ({payload['heldout_traces']}); "
        f"trained on {payload['train_traces']}"
    )


def add_study_args(parser: argparse.ArgumentParser) -> None:
    """The options every accuracy study script shares: its traces, runs, results and notes."""
    parser.add_argument("traces", help="training traces")
    parser.add_argument("--heldout", required=True, help="traces of other prompts: every prompt is scored")
    parser.add_argument("--runs", required=True, help="folder of the trained sets (resumable)")
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--name", default="moe-ref-a")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a busy CPU)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")


def markdown(payload: dict) -> str:
    k, layers, methods = payload["k"], payload["moe_layers"], payload["methods"]
    half = str(math.ceil(k / 2))
    lines = [
        f"# Predictor ablation: {payload['model']} (issue 18)",
        "",
        f"Held-out: {heldout_scored(payload)}; k = {k} of "
        f"{payload['n_expert']}. Epochs chosen on the training traces' validation prompts (loss); nothing "
        "selected on the held-out prompts. Percent; 'dec' columns: decode tokens only (a prefill batch "
        "routes all at once, so the prev-token input exists at decode time only).",
        "",
        f"| method | params/layer | val recall@{k} | recall@{k} | dec recall@{k} | top-1 | dec top-1 "
        f"| recall@{k}+{half} | dec recall@{k}+{half} | cover@{k}+{half} | exact-set | epochs | epoch s |",
        "|---" * 13 + "|",
    ]
    recipes = payload["recipes"]
    for name, method in methods.items():
        mean, recipe = method["mean"], recipes.get(name, {})
        decode = method["subsets"].get("decode", method)["mean"]
        cells = [
            str(recipe.get("parameters_per_layer", "")),
            f"{100 * recipe['val_recall_at_k']:.2f}" if recipe else "",
            f"{100 * mean['recall_at_k']:.2f}",
            f"{100 * decode['recall_at_k']:.2f}",
            f"{100 * mean['top1']:.2f}",
            f"{100 * decode['top1']:.2f}",
            f"{100 * mean['recall_at_k_plus_m'][half]:.2f}",
            f"{100 * decode['recall_at_k_plus_m'][half]:.2f}",
            f"{100 * mean['cover_at_k_plus_m'][half]:.2f}",
            f"{100 * mean['exact_set']:.2f}",
            str(max(recipe["epochs_run"])) if recipe else "",
            f"{recipe['train_seconds']:.0f}" if recipe else "",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## recall@{k} per layer",
        "",
        *per_layer_recall("method", methods, methods, layers),
    ]
    lines += ["", "## Gains (held-out recall@k, points; mean and per layer)", ""]
    lines += ["| item | vs | mean | " + " | ".join(f"L{il}" for il in layers) + " |"]
    lines.append("|---" * (len(layers) + 3) + "|")
    for row, (item, base) in payload["gains"].items():
        diff = np.array(methods[row]["per_layer"]["recall_at_k"]) - np.array(
            methods[base]["per_layer"]["recall_at_k"]
        )
        lines.append(
            f"| {item} ({row}) | {base} | {100 * diff.mean():+.2f} | "
            + " | ".join(f"{100 * d:+.2f}" for d in diff)
            + " |"
        )
    pairs = [(n, f"cross-layer-{n}") for n in methods if f"cross-layer-{n}" in methods]
    if pairs:
        lines += ["", "## Pre-attention minus cross-layer, same recipe (held-out recall@k, points)", ""]
        lines += ["| recipe | mean | " + " | ".join(f"L{il}" for il in layers) + " | layers ≥ 0 |"]
        lines.append("|---" * (len(layers) + 3) + "|")
        for pre, cross in pairs:
            diff = np.array(methods[pre]["per_layer"]["recall_at_k"]) - np.array(
                methods[cross]["per_layer"]["recall_at_k"]
            )
            cells = [
                f"{100 * diff.mean():+.2f}",
                *(f"{100 * d:+.2f}" for d in diff),
                f"{(diff >= 0).sum()}/{len(diff)}",
            ]
            lines.append(f"| {pre} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Size (analytical, Qwen3-30B-A3B shape: d = 2048, E = 128, 48 layers; budget 2 % of 6 GiB = "
        f"{BUDGET_BYTES / 2**20:.1f} MiB; int8 keeps the router prior in float32; ✓ = within budget)",
        "",
        "| recipe | params/layer | fp32 MiB | fp16 MiB | int8 MiB |",
        "|---|---|---|---|---|",
    ]
    for name, size in payload["size_qwen3_30b"].items():
        cells = [
            f"{size[f'{form}_mib']:.1f}" + (" ✓" if size[f"{form}_within_2pct_of_6gib"] else "")
            for form in ("fp32", "fp16", "int8")
        ]
        lines.append(f"| {name} | {size['parameters_per_layer']} | " + " | ".join(cells) + " |")
    formats = {n: r for n, r in recipes.items() if "fp16" in r}
    if formats:
        lines += ["", "## Weight formats (validation recall@k, mean over layers)", ""]
        lines += ["| recipe | fp32 | fp16 | int8 | bytes/layer fp32 / fp16 / int8 |", "|---|---|---|---|---|"]
        for name, r in formats.items():
            recalls = [
                r["fp16"]["fp32_val_recall_at_k"],
                r["fp16"]["val_recall_at_k"],
                r["int8"]["val_recall_at_k"],
            ]
            sizes = [r["bytes_per_layer"], r["fp16"]["bytes_per_layer"], r["int8"]["bytes_per_layer"]]
            cells = [f"{100 * v:.2f}" for v in recalls] + [" / ".join(str(b) for b in sizes)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "curve" in payload:
        lines += ["", f"## Data-size curve: {payload['curve']['recipe']} (held-out, mean over layers)", ""]
        lines += [f"| training tokens | recall@{k} | top-1 | recall@{k}+{half} |", "|---|---|---|---|"]
        for tokens, mean in sorted(payload["curve"]["points"].items(), key=lambda item: int(item[0])):
            values = [mean["recall_at_k"], mean["top1"], mean["recall_at_k_plus_m"][half]]
            lines.append(f"| {tokens} | " + " | ".join(f"{100 * v:.2f}" for v in values) + " |")
    lines += ["", *payload.get("notes", [])]
    return "\n".join(lines) + "\n"


def size_recipes(base: str, hiddens, ranks) -> dict[str, dict]:
    """{row name: recipe}: `base` at each hidden width, and at its own width with each rank."""
    recipe, stem = RECIPES[base], base.replace(f"-h{RECIPES[base]['hidden']}", "")
    rows = {f"{stem}@h{h}": {**recipe, "hidden": h} for h in hiddens}
    return rows | {f"{stem}@h{recipe['hidden']}r{r}": {**recipe, "rank": r} for r in ranks}


def size_rows(payload: dict, recipes: dict) -> dict:
    """Per scored row (shape, or shape:format): its shape, file bytes on this model, validation and
    held-out recall, and its size at the Qwen3-30B-A3B shape in its own format."""
    rows = {}
    for name, recipe in recipes.items():
        described = payload["recipes"][name]
        for form in FORMATS:
            row = name if form == "fp32" else f"{name}:{form}"
            own = described if form == "fp32" else described[form]
            qwen = qwen3_size(recipe)
            rows[row] = {
                "recipe": name,
                "format": form,
                "hidden": recipe["hidden"],
                "rank": recipe.get("rank", 0),
                "parameters_per_layer": described["parameters_per_layer"],
                "file_bytes_per_layer": own["bytes_per_layer"],
                "val_recall_at_k": own["val_recall_at_k"],
                "heldout": payload["methods"][row]["mean"],
                "qwen3_30b": qwen,
                "qwen3_30b_mib": qwen[f"{form}_mib"],
                "qwen3_30b_mib_without_prior": qwen[f"{form}_mib_without_prior"],
            }
    return rows


def choose_default(rows: dict, key: str, formats=FORMATS) -> str | None:
    """The row in one of `formats` with the highest validation recall (training traces' validation
    prompts: nothing held out) whose Qwen3-30B-A3B size (`key`) is within the budget; the smaller on
    a tie."""
    fits = [n for n, r in rows.items() if r[key] * 2**20 <= BUDGET_BYTES and r["format"] in formats]
    return max(fits, key=lambda n: (round(rows[n]["val_recall_at_k"], 4), -rows[n][key]), default=None)


def size_markdown(payload: dict) -> str:
    k, half, rows = payload["k"], str(math.ceil(payload["k"] / 2)), payload["size_rows"]
    layers = payload["moe_layers"]
    budget = BUDGET_BYTES / 2**20
    lines = [
        f"# Predictor size against recall: {payload['model']} (issue 18, item 5)",
        "",
        f"Recipe: {payload['size_base']} (residual on the router prior, rank+distill, prev-layer + "
        f"prev-token inputs) at hidden widths {', '.join(str(h) for h in payload['hidden'])}, and at "
        f"hidden {RECIPES[payload['size_base']]['hidden']} with the first Linear factorized through "
        f"rank R = {', '.join(str(r) for r in payload['ranks'])} (`train --rank`); every set as its fp32, "
        "fp16 and int8 files (`train --fp16 --int8`). Held-out: "
        f"{payload['heldout_tokens']} tokens of {len(payload['heldout_prompts'])} prompts collected "
        f"separately ({payload['heldout_traces']}); trained on {payload['train_traces']}; k = {k} of "
        f"{payload['n_expert']}. Every file is scored as written (onnxruntime). Epochs and the default "
        "below are chosen on the training traces' validation prompts; nothing is selected on the held-out "
        "prompts. Percent.",
        "",
        f"params/layer and bytes/layer: this model (d = {payload['n_embd']}, E = {payload['n_expert']}), "
        "the router prior included (files hold it today). Qwen3 MiB: the same shape for d = 2048, E = 128, "
        f"48 MoE layers, in the row's format; 'w/o prior' leaves out the router prior's E·d numbers per "
        "layer, which are the model's own ffn_gate_inp weights (scaled by its norm weights), already in "
        "the model: a predictor on the GPU need not hold a copy. ✓ = within 2 % of 6 GiB "
        f"({budget:.1f} MiB).",
        "",
        f"| row | shape | format | params/layer | bytes/layer | Qwen3 MiB | Qwen3 MiB w/o prior "
        f"| val recall@{k} | recall@{k} | dec recall@{k} | top-1 | recall@{k}+{half} | exact-set |",
        "|---" * 13 + "|",
    ]
    for name, r in rows.items():
        mean = r["heldout"]
        decode = payload["methods"][name]["subsets"].get("decode", payload["methods"][name])["mean"]
        tick = lambda mib: f"{mib:.1f}" + (" ✓" if mib * 2**20 <= BUDGET_BYTES else "")  # noqa: E731
        shape = f"h{r['hidden']}" + (f" r{r['rank']}" if r["rank"] else "")
        cells = [
            shape,
            r["format"],
            str(r["parameters_per_layer"]),
            str(r["file_bytes_per_layer"]),
            tick(r["qwen3_30b_mib"]),
            tick(r["qwen3_30b_mib_without_prior"]),
            f"{100 * r['val_recall_at_k']:.2f}",
            f"{100 * mean['recall_at_k']:.2f}",
            f"{100 * decode['recall_at_k']:.2f}",
            f"{100 * mean['top1']:.2f}",
            f"{100 * mean['recall_at_k_plus_m'][half]:.2f}",
            f"{100 * mean['exact_set']:.2f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in ("router-prior", "lru-8", "lru-16"):
        if name in payload["methods"]:
            mean = payload["methods"][name]["mean"]
            lines.append(
                f"| {name} | | | 0 | 0 | 0 | 0 | | {100 * mean['recall_at_k']:.2f} | | "
                f"{100 * mean['top1']:.2f} | {100 * mean['recall_at_k_plus_m'][half]:.2f} | "
                f"{100 * mean['exact_set']:.2f} |"
            )
    lines += [
        "",
        f"## recall@{k} per layer",
        "",
        *per_layer_recall("row", payload["methods"], rows, layers),
    ]
    lines += ["", "## Default within the budget (chosen on validation recall)", ""]
    lines += [
        "| counting | default | Qwen3 MiB | val recall@4 | held-out recall@4 | top-1 | recall@4+2 "
        "| cost vs best held-out row (points) |".replace("@4", f"@{k}").replace("+2", f"+{half}"),
        "|---|---|---|---|---|---|---|---|",
    ]
    best = payload["best_heldout_row"]
    for counting, choice in payload["defaults"].items():
        if choice["row"] is None:
            lines.append(f"| {counting} | none fits | | | | | | |")
            continue
        r = rows[choice["row"]]
        mean, top = r["heldout"], rows[best]["heldout"]
        lines.append(
            f"| {counting} | {choice['row']} | {choice['mib']:.1f} | {100 * r['val_recall_at_k']:.2f} | "
            f"{100 * mean['recall_at_k']:.2f} | {100 * mean['top1']:.2f} | "
            f"{100 * mean['recall_at_k_plus_m'][half]:.2f} | "
            f"{100 * (mean['recall_at_k'] - top['recall_at_k']):+.2f} recall@{k}, "
            f"{100 * (mean['top1'] - top['top1']):+.2f} top-1, "
            f"{100 * (mean['recall_at_k_plus_m'][half] - top['recall_at_k_plus_m'][half]):+.2f} "
            f"recall@{k}+{half} |"
        )
    lines += ["", f"Best held-out row (reported, not chosen): {best}.", "", *payload.get("notes", [])]
    return "\n".join(lines) + "\n"


def size_png(payload: dict) -> bytes:
    """Held-out recall@k against the Qwen3-30B-A3B size (without the prior) of each row."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    rows, k = payload["size_rows"], payload["k"]
    groups = {
        f"{shape}, {form}": [
            r for r in rows.values() if bool(r["rank"]) == (shape != "bottleneck") and r["format"] == form
        ]
        for shape in ("bottleneck", "low rank (h 128)")
        for form in FORMATS
    }
    markers = ("o-", "o--", "o:", "s-", "s--", "s:")
    for (label, members), marker in zip(groups.items(), markers, strict=True):
        group = sorted(members, key=lambda r: r["qwen3_30b_mib_without_prior"])
        xs = [r["qwen3_30b_mib_without_prior"] for r in group]
        ys = [100 * r["heldout"]["recall_at_k"] for r in group]
        axes.plot(xs, ys, marker, label=label)
        for r, x, y in zip(group, xs, ys, strict=True):
            if r["format"] != "fp32":
                continue
            text = f"r{r['rank']}" if r["rank"] else f"h{r['hidden']}"
            axes.annotate(text, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    axes.axvline(BUDGET_BYTES / 2**20, color="grey", linestyle=":", label="2 % of 6 GiB")
    prior = payload["methods"].get("router-prior")
    if prior:
        axes.axhline(
            100 * prior["mean"]["recall_at_k"], color="red", linestyle=":", label="router prior alone"
        )
    axes.set_xscale("log")
    axes.set_xlabel("predictor set for a Qwen3-30B-A3B shape, router prior not counted (MiB, log)")
    axes.set_ylabel(f"held-out recall@{k} (%)")
    axes.set_title(f"{payload['model']}: recall against size")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def size_study(args) -> int:
    """--size: train the rows of size_recipes, score every file on the held-out traces, write
    accuracy-size-<name>.{json,md,png}."""
    from edge_preattn.files import write_bytes_atomic

    base = args.size_base
    recipes = size_recipes(base, args.sizes, args.ranks)
    manifests = {name: trained(args, name, r, formats=True) for name, r in recipes.items()}
    if args.train_only:
        return 0
    traces, heldout = TraceSet(Path(args.traces)), TraceSet(Path(args.heldout))
    sets = {}
    for name in manifests:
        for form in FORMATS:  # each shape's fp32, fp16 and int8 files
            flags = {form: True} if form != "fp32" else {}
            row = name if form == "fp32" else f"{name}:{form}"
            sets[row] = evaluate.load_set(Path(args.runs) / name, traces.fingerprint, **flags)
    priors = evaluate.prior_weights(traces, None, sets)
    started = time.monotonic()
    payload = evaluate.evaluate(traces, sets, args.name, heldout, priors)
    print(f"[size] scored {len(sets)} sets in {time.monotonic() - started:.0f}s", flush=True)
    payload["n_embd"] = traces.n_embd
    payload["size_base"], payload["hidden"], payload["ranks"] = base, list(args.sizes), list(args.ranks)
    payload["recipes"] = {name: describe(m) for name, m in manifests.items()}
    payload["size_rows"] = rows = size_rows(payload, recipes)
    payload["budget_mib"] = BUDGET_BYTES / 2**20
    payload["qwen3_30b_shape"] = QWEN3_30B
    payload["defaults"] = {}
    for counting, key, formats in (
        ("any format, router prior counted (as files store it today)", "qwen3_30b_mib", FORMATS),
        (
            "any format, router prior read from the model (not counted)",
            "qwen3_30b_mib_without_prior",
            FORMATS,
        ),
        ("fp32 (what the library reads today), router prior counted", "qwen3_30b_mib", ("fp32",)),
        ("fp32, router prior not counted", "qwen3_30b_mib_without_prior", ("fp32",)),
    ):
        row = choose_default(rows, key, formats)
        payload["defaults"][counting] = {"row": row, "mib": rows[row][key] if row else None}
    payload["best_heldout_row"] = max(rows, key=lambda n: rows[n]["heldout"]["recall_at_k"])
    payload["notes"] = [
        "epoch s and train seconds (JSON `recipes`): 1 torch thread on this machine's shared 2-core CPU, "
        "nice 10: an upper bound, not a benchmark.",
        *args.note,
    ]
    results = Path(args.results)
    path = results / f"accuracy-size-{args.name}.json"
    write_json_atomic(path, payload)
    write_text_atomic(path.with_suffix(".md"), size_markdown(payload))
    write_bytes_atomic(path.with_suffix(".png"), size_png(payload))
    print(size_markdown(payload))
    return 0


def native(recipe: dict) -> bool:
    """Whether the library's own predictor feeds every history input of the recipe on the host too
    (patches 17 and 22; prev-router only in the model's graph, patch 26)."""
    from edge_preattn.predictors.predictor_weights import GRAPH_FEATURES

    return not any(f in GRAPH_FEATURES for f in features.parse(recipe.get("features")))


def push_train(args) -> tuple[dict, dict, dict]:
    """--push's runs, every choice on the validation prompts of the training traces: the PUSH_RECIPES
    rows; hidden 256 with the features chosen; then the chosen variant of every axis together, once
    with each feature set (and again at the shipped hidden width when 256 was chosen). Returns
    ({row: manifest}, {row: recipe}, {axis: chosen variant})."""
    names = args.recipes or list(PUSH_RECIPES)
    recipes = {name: RECIPES[name] for name in names}
    manifests = {name: trained(args, name, recipe) for name, recipe in recipes.items()}
    choice = {}
    for axis, variants in PUSH_AXES.items():
        present = {variant: row for variant, row in variants.items() if row in manifests}
        if present:
            choice[axis] = max(present, key=lambda variant: mean_val(manifests[present[variant]]))
    if args.recipes:  # a partial run: no second stage
        return manifests, recipes, choice
    narrow = PUSH_AXES["features"][choice["features"]]
    wide = narrow.replace("-h128", "-h256")
    recipes[wide] = {**RECIPES[narrow], "hidden": 256}
    manifests[wide] = trained(args, wide, recipes[wide])
    choice["hidden"] = "256" if mean_val(manifests[wide]) > mean_val(manifests[narrow]) else "128"
    changes = {"hidden": int(choice["hidden"])}  # what each chosen variant changes in the shipped recipe
    for axis, variant in choice.items():
        if axis in PUSH_AXES and axis != "features":
            recipe = RECIPES[PUSH_AXES[axis][variant]]
            changes |= {key: value for key, value in recipe.items() if SHIPPED.get(key) != value}
    for variant, row in PUSH_AXES["features"].items():
        name = f"best-of-axes+{variant}"
        recipes[name] = {**RECIPES[row], **changes}
        manifests[name] = trained(args, name, recipes[name])
    if changes["hidden"] != SHIPPED["hidden"]:  # the same at the shipped size (bytes, native time)
        for variant, row in PUSH_AXES["features"].items():
            name = f"best-of-axes@h{SHIPPED['hidden']}+{variant}"
            recipes[name] = {**RECIPES[row], **changes, "hidden": SHIPPED["hidden"]}
            manifests[name] = trained(args, name, recipes[name])
    return manifests, recipes, choice


def push_markdown(payload: dict) -> str:
    k, layers, methods = payload["k"], payload["moe_layers"], payload["methods"]
    half = str(math.ceil(k / 2))
    recipes, validation = payload["recipes"], payload["validation"]
    base = PUSH_AXES["features"]["both"]
    lines = [
        f"# Predictor accuracy push: {payload['model']} (issue 18)",
        "",
        f"Each row changes one thing in the shipped recipe ({base}: residual on the router prior, "
        "rank+distill, prev-layer + prev-token inputs, hidden 128, 8 epochs, patience 2, lr 1e-3), then "
        "hidden 256 with the features chosen, then the chosen variant of every axis together. Every "
        "choice is made on the validation prompts of the training traces "
        f"({len(payload['validation_prompts'])} prompts, {payload['validation_tokens']} tokens); the "
        f"held-out columns score {heldout_scored(payload)}; k = {k} of "
        f"{payload['n_expert']}. Percent. native: the library's own predictor (patch 17) feeds every "
        "input of the row; prev-x (the previous token's pre-attention state) is fed by `eval` only and "
        "would need native code.",
        "",
        f"| row | native | params/layer | val recall@{k} | val top-1 | val recall@{k}+{half} | recall@{k} "
        f"| dec recall@{k} | top-1 | recall@{k}+{half} | exact-set | epochs run | epoch s |",
        "|---" * 13 + "|",
    ]
    for name, recipe in recipes.items():
        mean, val = methods[name]["mean"], validation[name]["mean"]
        decode = methods[name]["subsets"].get("decode", methods[name])["mean"]
        cells = [
            "yes" if payload["native"][name] else "no",
            str(recipe["parameters_per_layer"]),
            f"{100 * val['recall_at_k']:.2f}",
            f"{100 * val['top1']:.2f}",
            f"{100 * val['recall_at_k_plus_m'][half]:.2f}",
            f"{100 * mean['recall_at_k']:.2f}",
            f"{100 * decode['recall_at_k']:.2f}",
            f"{100 * mean['top1']:.2f}",
            f"{100 * mean['recall_at_k_plus_m'][half]:.2f}",
            f"{100 * mean['exact_set']:.2f}",
            f"{min(recipe['epochs_run'])}-{max(recipe['epochs_run'])}",
            f"{recipe['train_seconds']:.0f}",
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name in ("router-prior", "lru-16"):
        mean = methods[name]["mean"]
        lines.append(
            f"| {name} | | | | | | {100 * mean['recall_at_k']:.2f} | | {100 * mean['top1']:.2f} | "
            f"{100 * mean['recall_at_k_plus_m'][half]:.2f} | {100 * mean['exact_set']:.2f} | | |"
        )
    lines += [
        "| target (issue 18) | | | | | | 93.00 | | 99.50 | 98.50 | | | |",
        "",
        "Chosen on validation: "
        + "; ".join(f"{axis} {variant}" for axis, variant in payload["choice"].items())
        + f". Highest validation recall@{k}: {payload['winner']}; of the native rows: "
        f"{payload['winner_native']}.",
        "",
        f"## held-out recall@{k} per layer",
        "",
        *per_layer_recall("row", methods, recipes, layers),
    ]
    lines += [
        "",
        f"## Gains over {base} (points, mean over layers; validation, then held-out per layer)",
        "",
        f"| row | val recall@{k} | val top-1 | val recall@{k}+{half} | recall@{k} | top-1 | "
        f"recall@{k}+{half} | " + " | ".join(f"L{il}" for il in layers) + " |",
        "|---" * (len(layers) + 7) + "|",
    ]
    for name in recipes:
        if name == base:
            continue
        val, val0 = validation[name]["mean"], validation[base]["mean"]
        mean, mean0 = methods[name]["mean"], methods[base]["mean"]
        diff = np.array(methods[name]["per_layer"]["recall_at_k"]) - np.array(
            methods[base]["per_layer"]["recall_at_k"]
        )
        cells = [
            val["recall_at_k"] - val0["recall_at_k"],
            val["top1"] - val0["top1"],
            val["recall_at_k_plus_m"][half] - val0["recall_at_k_plus_m"][half],
            mean["recall_at_k"] - mean0["recall_at_k"],
            mean["top1"] - mean0["top1"],
            mean["recall_at_k_plus_m"][half] - mean0["recall_at_k_plus_m"][half],
            *diff,
        ]
        lines.append(f"| {name} | " + " | ".join(f"{100 * c:+.2f}" for c in cells) + " |")
    lines += [
        "",
        "## Size (analytical, Qwen3-30B-A3B shape: d = 2048, E = 128, 48 layers; budget 2 % of 6 GiB = "
        f"{BUDGET_BYTES / 2**20:.1f} MiB; ✓ = within budget)",
        "",
        "| row | params/layer | fp32 MiB | fp32 MiB w/o prior | fp16 MiB | int8 MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, size in payload["size_qwen3_30b"].items():
        tick = lambda mib: f"{mib:.1f}" + (" ✓" if mib * 2**20 <= BUDGET_BYTES else "")  # noqa: E731
        cells = [
            tick(size["fp32_mib"]),
            tick(size["fp32_mib_without_prior"]),
            tick(size["fp16_mib"]),
            tick(size["int8_mib"]),
        ]
        lines.append(f"| {name} | {size['parameters_per_layer']} | " + " | ".join(cells) + " |")
    lines += ["", *payload.get("notes", [])]
    return "\n".join(lines) + "\n"


def push_study(args) -> int:
    """--push: train (push_train), score every row on the validation prompts and on the held-out
    traces, write accuracy-push-<name>.{json,md}."""
    manifests, recipes, choice = push_train(args)
    if args.train_only:
        return 0
    traces, heldout = TraceSet(Path(args.traces)), TraceSet(Path(args.heldout))
    sets = {name: evaluate.load_set(Path(args.runs) / name, traces.fingerprint) for name in manifests}
    priors = evaluate.prior_weights(traces, None, sets)
    payload = evaluate.evaluate(traces, sets, args.name, heldout, priors)
    scored = evaluate.evaluate(traces, sets, args.name)  # the training traces' validation prompts
    payload["validation"] = {name: scored["methods"][name] for name in sets}
    payload["validation_prompts"] = scored["heldout_prompts"]
    payload["validation_tokens"] = scored["heldout_tokens"]
    payload["recipes"] = {name: describe(m) for name, m in manifests.items()}
    payload["native"] = {name: native(recipe) for name, recipe in recipes.items()}
    payload["choice"] = choice
    val = {name: payload["validation"][name]["mean"]["recall_at_k"] for name in sets}
    payload["winner"] = max(val, key=val.get)
    payload["winner_native"] = max((n for n in val if payload["native"][n]), key=val.get)
    payload["size_qwen3_30b"] = {name: qwen3_size(recipe) for name, recipe in recipes.items()}
    payload["notes"] = [
        "val columns: the sets' own validation prompts of the training traces, scored like the held-out "
        "ones (evaluate without --heldout); the epoch each layer keeps is the one of lowest validation "
        "loss. epoch s: seconds in training epochs, summed over layers, 1 torch thread on this machine's "
        "shared 2-core CPU, nice 10: an upper bound, not a benchmark.",
        *args.note,
    ]
    path = Path(args.results) / f"accuracy-push-{args.name}.json"
    write_json_atomic(path, payload)
    write_text_atomic(path.with_suffix(".md"), push_markdown(payload))
    print(push_markdown(payload))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_study_args(parser)
    parser.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    parser.add_argument("--patience", type=int, default=TrainSettings.patience)
    parser.add_argument("--recipes", nargs="+", help="train only these (default all, then the sizes)")
    parser.add_argument(
        "--size",
        action="store_true",
        help="the size study instead (issue 18 item 5): --size-base at each --sizes width and each --ranks "
        f"rank, its fp16/int8 files; writes accuracy-size-NAME.{{json,md,png}} (defaults: {SIZE_BASE}, "
        f"widths {SIZE_HIDDEN}, ranks {SIZE_RANKS})",
    )
    parser.add_argument(
        "--push",
        action="store_true",
        help="what else raises recall beyond the shipped recipe: one change at a time (PUSH_RECIPES), "
        "hidden 256, then the best of each axis together; writes accuracy-push-NAME.{json,md}",
    )
    parser.add_argument(
        "--sizes", type=int, nargs="*", help=f"hidden widths (default {SIZES}; --size: {SIZE_HIDDEN})"
    )
    parser.add_argument("--ranks", type=int, nargs="*", default=list(SIZE_RANKS), help="--size: ranks")
    parser.add_argument(
        "--size-base",
        help="the recipe whose hidden width --sizes varies and whose fp16/int8 cost is measured "
        f"(default: prior-h128+distill, the best one without history inputs; --size: {SIZE_BASE})",
    )
    parser.add_argument(
        "--compare", action="append", default=[], help="another predictor folder to score beside (repeatable)"
    )
    parser.add_argument(
        "--curve", type=int, nargs="*", default=[], help="training-token counts for --size-base"
    )
    parser.add_argument("--train-only", action="store_true", help="train, write nothing (parallel runs)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.push:
        return push_study(args)
    if args.size:
        args.size_base = args.size_base or SIZE_BASE
        args.sizes = list(SIZE_HIDDEN) if args.sizes is None else args.sizes
        return size_study(args)
    args.size_base = args.size_base or "prior-h128+distill"
    args.sizes = list(SIZES) if args.sizes is None else args.sizes
    names = args.recipes or DEFAULT_RECIPES
    manifests = {name: trained(args, name, RECIPES[name]) for name in names}
    recipes_used = {name: RECIPES[name] for name in names}
    for hidden in args.sizes:
        name = f"{args.size_base.replace('-h128', '')}@h{hidden}"
        recipes_used[name] = {**RECIPES[args.size_base], "hidden": hidden}
        manifests[name] = trained(args, name, recipes_used[name])
    if args.size_base in manifests:
        manifests[args.size_base] = trained(args, args.size_base, RECIPES[args.size_base], formats=True)
    curve = {
        tokens: trained(
            args, f"{args.size_base}@n{tokens}", {**RECIPES[args.size_base], "max_train_samples": tokens}
        )
        for tokens in args.curve
    }
    if args.train_only:
        return 0
    pre = {n: m for n, m in manifests.items() if m["input"] == "x_pre"}
    winner = max(pre, key=lambda n: mean_val(pre[n]))  # on validation prompts of the training traces
    traces, heldout = TraceSet(Path(args.traces)), TraceSet(Path(args.heldout))
    sets = {name: evaluate.load_set(Path(args.runs) / name, traces.fingerprint) for name in manifests}
    for directory in args.compare:  # sets trained elsewhere (e.g. the shipped ones), scored alike
        sets[f"compare:{Path(directory).name}"] = evaluate.load_set(Path(directory), traces.fingerprint)
    priors = evaluate.prior_weights(traces, None, sets)
    payload = evaluate.evaluate(traces, sets, args.name, heldout, priors)
    payload["recipes"] = {name: describe(m) for name, m in manifests.items()}
    payload["winner"] = winner
    if curve:  # the data-size curve of --size-base: held-out means per training-token count
        curve_sets = {
            n: evaluate.load_set(Path(args.runs) / f"{args.size_base}@n{n}", traces.fingerprint)
            for n in curve
        }
        scored = evaluate.evaluate(traces, curve_sets, args.name, heldout)["methods"]
        full = payload["methods"][args.size_base]["mean"]
        points = {str(n): scored[n]["mean"] for n in curve} | {
            str(manifests[args.size_base]["train_tokens"]): full
        }
        payload["curve"] = {"recipe": args.size_base, "points": points}
    payload["gains"] = {row: gain for row, gain in GAINS.items() if row in manifests and gain[1] in manifests}
    sized = {"paper-h2048": PAPER, **recipes_used}  # the paper's shape is sized even when not trained
    payload["size_qwen3_30b"] = {name: qwen3_size(recipe) for name, recipe in sized.items()}
    payload["notes"] = [
        f"Highest validation recall@k of the pre-attention recipes: {winner}. Sizes and formats: "
        f"{args.size_base}.",
        f"epoch s: seconds spent in training epochs, summed over layers, {args.threads} torch thread(s) on "
        "this machine's CPU as it was (shared, nice 10): an upper bound, not a benchmark.",
        *args.note,
    ]
    results = Path(args.results)
    path = results / f"accuracy-ablation-{args.name}.json"
    write_json_atomic(path, payload)
    write_text_atomic(path.with_suffix(".md"), markdown(payload))
    crosses = [n for n in manifests if n.startswith("cross-layer")]  # the first is the one compared
    shown = ["paper-h2048", "paper-h128", args.size_base, winner, *crosses]
    main_sets = {
        f"{evaluate.set_name(sets[n].manifest)} ({n})": sets[n] for n in dict.fromkeys(shown) if n in sets
    }
    eval_report.write_reports(
        evaluate.evaluate(traces, main_sets, args.name, heldout, priors), results, args.name
    )
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
