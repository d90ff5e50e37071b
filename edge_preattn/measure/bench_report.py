"""`bench`'s results: per configuration the medians and spread over rounds, tokens against the
reference, the physical limit; the headline; the markdown table and the PNG plots. Split from
bench.py, unchanged."""

import logging
from pathlib import Path

import numpy as np

from ..files import write_bytes_atomic, write_json_atomic, write_text_atomic
from ..runtime.options import PREDICTION_MODES
from ..units import format_bytes
from .bench_plan import STOCK_CONFIGS, RunSpec, edge_mode

log = logging.getLogger(__name__)
SUMMARY_STATS = (
    "hit_rate",
    "misses_per_token",
    "bytes_uploaded_per_token",
    "stall_ms_per_token",
    "predictor_ms_per_call",
    "native_predictions_per_token",
    "native_predictor_ms_per_token",
    "forced_uploads",
)


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {
        "median": round(float(np.median(values)), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.median(values)), 4) if values else None


def summarize(
    spec: RunSpec,
    records: list[dict],
    reference: list[dict],
    bandwidth: dict | None,
    budget: int,
) -> dict:
    """One row of the results: medians and spread over rounds, tokens vs the reference, the limit."""
    ok = [r for r in records if "error" not in r]
    row = {
        "name": spec.name,
        "kind": spec.kind,
        "placement": spec.placement,
        "run_key": spec.key,
        "rounds": len(ok),
        "decode_tok_s": _spread([r["decode_tok_s"] for r in ok]),
        "prefill_tok_s": _spread([r["prefill_tok_s"] for r in ok]),
        "ms_per_token_p50": None,
        "ms_per_token_p95": None,
        "vram_bytes": max((r["vram_bytes"] for r in ok if r["vram_bytes"] is not None), default=None),
        "vram_source": ok[0]["vram_source"] if ok else None,
        "estimated_vram_bytes": spec.estimated_vram_bytes,
        "fits_budget": spec.estimated_vram_bytes <= budget,
        "hit_rate": None,
        "bytes_uploaded_per_token": None,
        "stall_ms_per_token": None,
        "tokens_equal_stock": False,
        "physical_limit_tok_s": None,
    }
    errors = [r["error"] for r in records if "error" in r]
    if errors:
        row["errors"] = errors
    if not ok:
        return row
    decode_ms = np.array([ms for r in ok for ms in r["decode_ms"]] or [0.0])
    row["ms_per_token_p50"] = round(float(np.percentile(decode_ms, 50)), 3)
    row["ms_per_token_p95"] = round(float(np.percentile(decode_ms, 95)), 3)
    if spec.kind == "edge":
        for key in SUMMARY_STATS:
            row[key] = _median([r["stats"].get(key) for r in ok])
        predictor_ms = row.pop("predictor_ms_per_call")
        native_calls, native_ms = (
            row.pop("native_predictions_per_token"),
            row.pop("native_predictor_ms_per_token"),
        )
        if not predictor_ms and native_calls:  # the library's own predictor, on the decode thread
            predictor_ms = round(native_ms / native_calls, 4)
        row["predictor_ms_per_layer"] = predictor_ms if edge_mode(spec.name)[0] in PREDICTION_MODES else None
        # the ubatch where a prediction mode switched itself off (late or idle predictions), per round
        row["prediction_off_at_ubatch"] = [r["stats"].get("prediction_off_at_ubatch") for r in ok]
    reference_ok = [r for r in reference if "error" not in r]
    if reference_ok:
        row["tokens_equal_stock"] = all(r["tokens"] == reference_ok[0]["tokens"] for r in ok)
    if spec.kind == "edge" and reference_ok and bandwidth and "error" not in bandwidth:
        resident_ms = float(np.percentile([ms for r in reference_ok for ms in r["decode_ms"]], 50))
        pinned = any(r["stats"].get("pinned_bytes") for r in ok)
        bus = (
            bandwidth["pinned_bytes_per_s"]
            if pinned and bandwidth["pinned_bytes_per_s"]
            else bandwidth["pageable_bytes_per_s"]
        )
        if spec.bandwidth_bytes_per_s:
            bus = min(bus, spec.bandwidth_bytes_per_s)
        bus_ms = (row["bytes_uploaded_per_token"] or 0) / bus * 1e3
        limit_ms = max(resident_ms, bus_ms)
        row["physical_limit_tok_s"] = round(1e3 / limit_ms, 3) if limit_ms > 0 else None
        row["physical_limit"] = {
            "resident_ms_per_token": round(resident_ms, 4),
            "bus_ms_per_token": round(bus_ms, 4),
            "bus_bytes_per_s": bus,
            "bus": ("pinned" if pinned else "pageable") + (" capped" if spec.bandwidth_bytes_per_s else ""),
            "measured_over_limit": round(row["ms_per_token_p50"] / limit_ms, 3) if limit_ms > 0 else None,
            # what is left of the step once compute and a bus that never overlaps it are paid
            "other_ms_per_token": round(row["ms_per_token_p50"] - resident_ms - bus_ms, 4),
        }
    return row


def headline(rows: list[dict]) -> dict:
    """Best edge-preattn mode vs best stock configuration that fits, prediction vs lru, limit gap."""

    def best(candidates: list[dict]) -> dict | None:
        scored = [r for r in candidates if r["decode_tok_s"]]
        return max(scored, key=lambda r: r["decode_tok_s"]["median"], default=None)

    edge = best([r for r in rows if r["kind"] == "edge"])
    stock = best([r for r in rows if r["kind"] == "stock" and r["fits_budget"]])
    lru = next((r for r in rows if r["name"] == "lru" and r["decode_tok_s"]), None)
    predicted = best([r for r in rows if edge_mode(r["name"])[0] in PREDICTION_MODES])
    result = {
        "best_edge": edge and edge["name"],
        "best_stock": stock and stock["name"],
        "edge_over_stock": None,
        "best_prediction_mode": predicted and predicted["name"],
        "prediction_over_lru": None,
        "best_edge_measured_over_limit": edge
        and (edge.get("physical_limit") or {}).get("measured_over_limit"),
    }
    if edge and stock:
        result["edge_over_stock"] = round(edge["decode_tok_s"]["median"] / stock["decode_tok_s"]["median"], 3)
    if predicted and lru:
        result["prediction_over_lru"] = round(
            predicted["decode_tok_s"]["median"] / lru["decode_tok_s"]["median"], 3
        )
    return result


def file_label(text: str) -> str:
    """A budget or rate as a file-name part: 8GiB, 25pct, 16GBps."""
    return text.strip().replace(" ", "").replace("%", "pct").replace("/s", "ps").replace("/", "_")


TABLE_HEADER = (
    "config",
    "placement",
    "decode tok/s (min–max)",
    "prefill tok/s",
    "ms/tok p50",
    "p95",
    "VRAM",
    "hit rate",
    "misses/tok",
    "uploaded/tok",
    "stall ms/tok",
    "pred ms/layer",
    "= stock",
    "limit tok/s",
    "measured/limit",
)


def _cells(row: dict) -> list[str]:
    def number(value, digits: int = 1) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    def size(value) -> str:
        return "–" if value is None else format_bytes(value)

    decode, prefill = row["decode_tok_s"], row["prefill_tok_s"]
    return [
        row["name"] + ("" if row["fits_budget"] else " (over budget)"),
        row["placement"],
        f"{decode['median']:.1f} ({decode['min']:.1f}–{decode['max']:.1f})" if decode else "failed",
        number(prefill and prefill["median"]),
        number(row["ms_per_token_p50"], 2),
        number(row["ms_per_token_p95"], 2),
        size(row["vram_bytes"]),
        number(row.get("hit_rate"), 3),
        number(row.get("misses_per_token"), 2),
        size(row.get("bytes_uploaded_per_token")),
        number(row.get("stall_ms_per_token"), 2),
        number(row.get("predictor_ms_per_layer"), 3),
        "yes" if row["tokens_equal_stock"] else "NO",
        number(row["physical_limit_tok_s"]),
        number((row.get("physical_limit") or {}).get("measured_over_limit"), 2),
    ]


def _emulation_lines(emulate: dict | None) -> list[str]:
    """What an emulated run stood for, and what its calibration reached (emulate.edge_gpu)."""
    if not emulate:
        return []
    measured = emulate.get("measured") or {}
    reached = (
        f": {measured['client_sms']} of {measured['device_sms']} SMs, device copy "
        f"{measured['client_copy_gbps']:.0f} GB/s (target {emulate['memory_bytes_per_s'] / 1e9:.0f}, "
        f"{measured['client_copy_gbps_alone']:.0f} without the memory load, "
        f"which ran at duty {measured['load_duty']:.2f})"
        if measured
        else ""
    )
    return [f"Emulated {emulate['name']}, {emulate['card_class']}{reached}.", ""]


def markdown(result: dict) -> str:
    gpus = ", ".join(g["name"] or "?" for g in result["machine"]["gpus"]) or "no GPU"
    cap = result["bandwidth_bytes_per_s"]
    lines = [
        f"# bench: {result['model']} at {format_bytes(result['budget_bytes'])}"
        + (f", uploads capped at {cap / 1e9:g} GB/s" if cap else ""),
        "",
        f"{result['backend']} · {gpus} · {result['machine']['cpu']} ({result['threads']} threads) · "
        f"{len(result['prompts'])} prompts × {result['n_predict']} tokens · -c {result['n_ctx']} · "
        f"rounds {result['rounds_completed']}/{result['rounds']}",
        "",
        *_emulation_lines(result.get("emulate")),
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|---|---|" + "---:|" * 10 + ":-:|---:|---:|",
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["configs"]]
    head = result["headline"]
    lines.append("")
    if head["edge_over_stock"] is not None:
        lines.append(
            f"Best edge-preattn ({head['best_edge']}) / best stock that fits ({head['best_stock']}): "
            f"**{head['edge_over_stock']:.2f}×**."
        )
    if head["prediction_over_lru"] is not None:
        lines.append(
            f"Best prediction mode ({head['best_prediction_mode']}) / lru: "
            f"**{head['prediction_over_lru']:.2f}×**."
        )
    if head["best_edge_measured_over_limit"] is not None:
        lines.append(
            f"{head['best_edge']} takes {head['best_edge_measured_over_limit']:.2f}× the time of its "
            "physical limit."
        )
    lines += [f"- {note}" for note in result["notes"]]
    lines += [
        f"- {row['name']}: prediction switched itself off (late or idle predictions) at ubatch "
        + ", ".join("–" if at is None else str(at) for at in row["prediction_off_at_ubatch"])
        + " of its rounds; it ran as lru from there"
        for row in result["configs"]
        if any(at is not None for at in row.get("prediction_off_at_ubatch") or [])
    ]
    split = [
        f"{row['name']} {row['ms_per_token_p50']:.2f} = {limit['resident_ms_per_token']:.2f} compute "
        f"+ {limit['bus_ms_per_token']:.2f} bus + {limit['other_ms_per_token']:.2f} other"
        for row in result["configs"]
        if (limit := row.get("physical_limit")) and "other_ms_per_token" in limit
    ]
    if split:
        lines.append(
            "- where the time goes, ms/token (p50) = all-on-GPU step + bytes uploaded ÷ bus rate + the "
            "rest (graph splits, host work; negative: uploads overlapped compute): " + "; ".join(split)
        )
    h2d = result["host_to_device"]
    if "error" in h2d:
        lines.append(f"- host → device bandwidth not measured ({h2d['error']}): no physical limits")
    else:
        pinned = h2d.get("pinned_bytes_per_s")
        lines.append(
            f"- host → {h2d['target']}: {h2d['pageable_bytes_per_s'] / 1e9:.2f} GB/s pageable"
            + (f", {pinned / 1e9:.2f} GB/s pinned" if pinned else "")
        )
    lines += [
        "",
        f"Command: `{result['command']}` · commit {result['commit']}",
        "",
    ]
    return "\n".join(lines)


def _figure(width: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, 4))
    FigureCanvasAgg(figure)
    return figure


def _png(figure) -> bytes:
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def bars_png(result: dict) -> bytes:
    rows = [r for r in result["configs"] if r["decode_tok_s"]]
    figure = _figure(max(6.0, 0.9 * len(rows)))
    axes = figure.add_subplot(1, 1, 1)
    medians = [r["decode_tok_s"]["median"] for r in rows]
    errors = [
        [m - r["decode_tok_s"]["min"] for m, r in zip(medians, rows, strict=True)],
        [r["decode_tok_s"]["max"] - m for m, r in zip(medians, rows, strict=True)],
    ]
    colors = ["#888888" if r["kind"] == "stock" else "#1f77b4" for r in rows]
    axes.bar(range(len(rows)), medians, yerr=errors, color=colors, capsize=3)
    limits = [r["physical_limit_tok_s"] for r in rows]
    axes.scatter(
        [i for i, v in enumerate(limits) if v],
        [v for v in limits if v],
        marker="_",
        s=300,
        color="red",
        label="physical limit",
    )
    axes.set_xticks(
        range(len(rows)), [r["name"] + ("*" if not r["fits_budget"] else "") for r in rows], rotation=30
    )
    axes.set(
        ylabel="decode tok/s (median, min–max)",
        title=f"{result['model']} at {format_bytes(result['budget_bytes'])}",
    )
    axes.grid(axis="y", alpha=0.3)
    if any(limits):
        axes.legend(fontsize=8)
    return _png(figure)


def sweep_png(results: list[dict]) -> bytes:
    figure = _figure(7.0)
    axes = figure.add_subplot(1, 1, 1)
    names = dict.fromkeys(r["name"] for result in results for r in result["configs"])
    scale, unit = (1024**3, "GiB") if max(r["budget_bytes"] for r in results) >= 1024**3 else (1024**2, "MiB")
    for name in names:
        points = [
            (result["budget_bytes"] / scale, row["decode_tok_s"]["median"])
            for result in results
            for row in result["configs"]
            if row["name"] == name and row["decode_tok_s"]
        ]
        if points:
            style = "--" if name in STOCK_CONFIGS else "-"
            axes.plot(*zip(*points, strict=True), style, marker="o", label=name)
    axes.set(
        xlabel=f"VRAM budget ({unit})",
        ylabel="decode tok/s (median)",
        title=f"{results[0]['model']}: tok/s vs budget",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(figure)


def write_results(out_dir: Path, stem: str, results: list[dict]) -> list[Path]:
    written = []
    for result in results:
        name = f"{stem}-{result['budget']}" + (f"-bw{result['bandwidth']}" if result["bandwidth"] else "")
        write_json_atomic(
            out_dir / f"{name}.json", {k: v for k, v in result.items() if k not in ("budget", "bandwidth")}
        )
        write_text_atomic(out_dir / f"{name}.md", markdown(result))
        written += [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    try:
        for result in results:
            name = f"{stem}-{result['budget']}" + (f"-bw{result['bandwidth']}" if result["bandwidth"] else "")
            write_bytes_atomic(out_dir / f"{name}.png", bars_png(result))
        for bandwidth in dict.fromkeys(r["bandwidth"] for r in results):
            group = [r for r in results if r["bandwidth"] == bandwidth]
            if len(group) > 1:
                path = out_dir / (f"{stem}-sweep" + (f"-bw{bandwidth}" if bandwidth else "") + ".png")
                write_bytes_atomic(path, sweep_png(group))
    except ImportError:
        log.warning("matplotlib is not installed: no PNG plots (pip install matplotlib)")
    return written
