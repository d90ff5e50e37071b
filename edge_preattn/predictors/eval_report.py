"""What `eval` writes: the accuracy table (the analogue of the paper's Table 4, with recall@k by
phase), its per-layer plots (figures 6-7) and the calibration report with its reliability diagram.
Split from evaluate.py, which measures; moved unchanged."""

import io
import math
from pathlib import Path

import numpy as np

from ..files import output_folder, write_bytes_atomic, write_json_atomic, write_text_atomic


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def _columns(k: int, margins: list[int]) -> list[tuple[str, object]]:
    """(header, how to read the number from a mean dict), in the table's order."""
    columns: list[tuple[str, object]] = [("exact-set", "exact_set"), (f"recall@{k}", "recall_at_k")]
    columns += [(f"recall@{k}+{m}", ("recall_at_k_plus_m", str(m))) for m in margins]
    columns += [(f"cover@{k}+{m}", ("cover_at_k_plus_m", str(m))) for m in margins]
    return [*columns, ("top-1", "top1")]


def _value(mean: dict, key) -> float:
    return mean[key[0]][key[1]] if isinstance(key, tuple) else mean[key]


def markdown(payload: dict) -> str:
    """The analogue of the paper's Table 4 (first MoE layer and mean), plus recall@k by phase."""
    k, layers, methods = payload["k"], payload["moe_layers"], payload["methods"]
    columns = _columns(k, payload["margins"])
    by_phase = payload["heldout_tokens_by_phase"]
    source = payload.get("heldout_traces")
    prompts = "validation prompts" if source is None else f"prompts of separately collected traces ({source})"
    lines = [
        f"# Expert-prediction accuracy: {payload['model']}",
        "",
        f"Held-out: {payload['heldout_tokens']} tokens ({by_phase['prefill']} prefill, {by_phase['decode']} "
        f"decode) of {len(payload['heldout_prompts'])} {prompts}; k = {k} of "
        f"{payload['n_expert']} experts; MoE layers {layers[0]}-{layers[-1]}; model fingerprint "
        f"`{payload['fingerprint'][:16]}`. Percent of tokens (recall: of experts).",
        "",
        "exact-set: set(P[:k]) = T (the paper's exact-match, literal reading) · recall@k: |P[:k] ∩ T| / k "
        "(exact-match, likely reading) · recall@k+m: |P[:k+m] ∩ T| / k (over-provisioning, likely) · "
        "cover@k+m: T ⊆ P[:k+m] (over-provisioning, strict) · top-1: P[0] ∈ T.",
    ]
    for title, block in (
        (f"First MoE layer (layer {layers[0]})", "first_layer"),
        (f"Mean over {len(layers)} MoE layers", "mean"),
    ):
        lines += ["", f"## {title}", "", "| method | " + " | ".join(h for h, _ in columns) + " |"]
        lines.append("|---" * (len(columns) + 1) + "|")
        for name, method in methods.items():
            cells = [_percent(_value(method[block], key)) for _, key in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    phases = [p for p in by_phase if all(p in m["subsets"] for m in methods.values())]  # PHASES order
    lines += [
        "",
        "## recall@k by phase (mean over layers)",
        "",
        "| method | all | " + " | ".join(phases) + " |",
    ]
    lines.append("|---" * (len(phases) + 2) + "|")
    for name, method in methods.items():
        cells = [_percent(method["mean"]["recall_at_k"])]
        cells += [_percent(method["subsets"][p]["mean"]["recall_at_k"]) for p in phases]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cross_name = next((name for name in methods if name.startswith("cross-layer")), None)
    if cross_name is not None:
        lines += ["", f"## Pre-attention minus {cross_name}, recall@k per layer", ""]
        cross = np.array(methods[cross_name]["per_layer"]["recall_at_k"])
        for name in (n for n in methods if n.startswith("preattn")):
            diff = np.array(methods[name]["per_layer"]["recall_at_k"]) - cross
            worst = int(np.argmin(diff))
            lines.append(
                f"- {name}: mean {100 * diff.mean():+.2f} points, min {100 * diff[worst]:+.2f} (layer "
                f"{layers[worst]}), ≥ 0 on {int((diff >= 0).sum())}/{len(diff)} layers"
            )
    lines += [
        "",
        "lru-C rows: an LRU cache of C slots per layer, cleared at each prompt start, has no ranked list: "
        "its recall columns hold the hit rate (hits / (k × tokens)), exact-set and cover its share of "
        "tokens with no miss, top-1 the share whose router's best expert was cached. oracle = the "
        "router's own ids (a sanity line). popularity counts the training prompts only. router-prior: "
        "the layer's own router on the pre-attention state mapped to the router input's space "
        "(x_pre / w_attn_norm · w_ffn_norm), no training.",
        "",
    ]
    return "\n".join(lines)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def plots(payload: dict) -> dict[str, bytes]:
    """{suffix: PNG}: per-layer lines of every method (figures 6-7) and bars of the mean table."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, layers, methods = payload["k"], payload["moe_layers"], payload["methods"]
    half = str(math.ceil(k / 2))  # the paper's over-provisioning margin (10 for k = 6, 12 for k = 8)
    panels = [
        (f"recall@{k}", lambda b: b["recall_at_k"]),
        (f"recall@{k}+{half}", lambda b: b["recall_at_k_plus_m"][half]),
        ("top-1", lambda b: b["top1"]),
    ]
    lines = Figure(figsize=(5 * len(panels), 4))
    FigureCanvasAgg(lines)
    for index, (title, pick) in enumerate(panels):
        axes = lines.add_subplot(1, len(panels), index + 1)
        for name, method in methods.items():
            style = "--" if name == "oracle" else (":" if name.startswith("lru") else "-")
            axes.plot(layers, pick(method["per_layer"]), style, marker="o", markersize=3, label=name)
        axes.set(title=f"{title} per MoE layer", xlabel="layer", ylim=(0, 1.02))
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    lines.axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    lines.suptitle(f"{payload['model']}: held-out accuracy (k = {k} of {payload['n_expert']})")
    wanted = ("exact_set", "recall_at_k", ("recall_at_k_plus_m", half), ("cover_at_k_plus_m", half), "top1")
    columns = [column for column in _columns(k, payload["margins"]) if column[1] in wanted]
    bars = Figure(figsize=(12, 4))
    FigureCanvasAgg(bars)
    width = 0.8 / len(methods)
    for index, (title, block) in enumerate(
        (("first MoE layer", "first_layer"), ("mean over layers", "mean"))
    ):
        axes = bars.add_subplot(1, 2, index + 1)
        for j, (name, method) in enumerate(methods.items()):
            values = [_value(method[block], key) for _, key in columns]
            axes.bar(np.arange(len(columns)) + j * width, values, width, label=name)
        axes.set_xticks(np.arange(len(columns)) + 0.4 - width / 2, [h for h, _ in columns], fontsize=8)
        axes.set(title=title, ylim=(0, 1.02))
        axes.grid(axis="y", alpha=0.3)
    bars.axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return {"layers": _png(lines), "mean": _png(bars)}


def write_reports(payload: dict, out_dir: Path, name: str) -> list[Path]:
    output_folder(out_dir)
    paths = [out_dir / f"accuracy-{name}.json", out_dir / f"accuracy-{name}.md"]
    write_json_atomic(paths[0], payload)
    write_text_atomic(paths[1], markdown(payload))
    for suffix, png in plots(payload).items():
        paths.append(out_dir / f"accuracy-{name}-{suffix}.png")
        write_bytes_atomic(paths[-1], png)
    return paths


def calibration_markdown(report: dict, name: str) -> str:
    lines = [
        f"# Calibration and adaptive prefetch: {name}",
        "",
        "Per-layer temperature T of sigmoid(score / T), fitted on the held-out tokens; adaptive "
        "prefetch takes, per token, the fewest top-ranked experts whose calibrated share reaches the "
        "target recall (at least k). Figures are from the traces alone, with no cache (every prefetch "
        "uploads).",
        "",
        "| target | experts per token (all layers) | recall | bytes per token |",
        "|---|---|---|---|",
    ]
    for target, row in report["targets"].items():
        size = "" if row["bytes_per_token"] is None else f"{row['bytes_per_token'] / 2**20:.2f} MiB"
        lines.append(f"| {target} | {row['experts_per_token']:.2f} | {100 * row['recall']:.2f} | {size} |")
    lines += ["", "| layer | T |", "|---|---|"]
    lines += [f"| {il} | {layer['temperature']:.3f} |" for il, layer in report["layers"].items()]
    return "\n".join(lines) + "\n"


def reliability_png(report: dict, name: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    for il, layer in report["layers"].items():
        bins = layer["reliability"]["bins"]
        axis.plot(
            [b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label=f"layer {il}"
        )
    axis.set(
        xlabel="calibrated probability",
        ylabel="observed selection frequency",
        title=f"{name}: reliability of expert probabilities",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    axis.legend(fontsize=7)
    return _png(figure)
