"""What a run reports: the per-layer counters the controller keeps beside the library's, and the
summary `run`, `serve` and `bench` print and write (`run_stats`), per generated token where that is
the unit. Split from controller.py and run.py (moved unchanged) so each stays readable at once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..model.engine import Engine, Generation
from ..units import format_bytes

if TYPE_CHECKING:  # an annotation only: cache_runtime imports controller, which imports this module
    from .cache_runtime import CacheRuntime


@dataclass
class LayerCounters:
    tokens: int = 0  # tokens whose experts this layer read from the bank
    hits: int = 0  # (token, expert) pairs resident at routing, prefetched or not
    late: int = 0  # prefetched, but the routing waited for a prefetch upload in flight
    misses: int = 0  # uploaded at routing
    cpu: int = 0  # missed and computed on the CPU instead
    deferred_uploads: int = 0  # lru with misses on the CPU: uploaded after the layer, for later tokens
    prefetch_issued: int = 0
    prefetch_hits: int = 0  # of the hits: resident thanks to a prefetch
    prefetch_wasted: int = 0
    prefetch_late: int = 0  # predicted experts the library refused: the router had already decided
    prediction_stale: int = 0  # predictions dropped whole: their ubatch past, or their layer routed in it
    prefetch_dropped: int = 0  # prefetches cut short by the bandwidth budget
    backlog_dropped: int = 0  # not predicted: the prefetch thread was still busy with older work
    lookahead_predictions: int = 0  # predictions of this layer made at an earlier layer's hook
    lookahead_superseded: int = 0  # dropped because this layer's own prediction was already queued
    stall_s: float = 0.0
    predictor_s: float = 0.0
    predictor_calls: int = 0


@dataclass
class RuntimeStats:
    layers: dict[int, LayerCounters] = field(default_factory=dict)
    cached_tokens: int = 0

    def totals(self) -> LayerCounters:
        total = LayerCounters()
        for counters in self.layers.values():
            for name in total.__dataclass_fields__:
                setattr(total, name, getattr(total, name) + getattr(counters, name))
        return total


def run_stats(record: Generation, engine: Engine, runtime: CacheRuntime | None) -> dict:
    """The numbers a user compares between modes, per generated token where that is the unit."""
    ms = np.array(record.decode_seconds) * 1e3 if record.decode_seconds else np.zeros(1)
    stats = {
        "prompt_tokens": len(record.prompt_tokens),
        "generated_tokens": len(record.tokens),
        "prefill_tok_s": round(record.prefill_tok_s, 2),
        "decode_tok_s": round(record.decode_tok_s, 2),
        "ms_per_token_p50": round(float(np.percentile(ms, 50)), 3),
        "ms_per_token_p95": round(float(np.percentile(ms, 95)), 3),
        "vram_used_bytes": sum(
            total - free for free, total in map(engine.api.device_memory, engine.api.gpus())
        ),
    }
    if runtime is not None:
        runtime_stats = runtime.controller.stats  # one read of the library's per-layer counters
        total = runtime_stats.totals()
        bank, miss = runtime.bank.stats(), runtime.bank.miss_stats()
        tokens = max(1, runtime_stats.cached_tokens)
        expert_bytes = runtime.controller.bytes_per_expert
        selected = max(1, total.hits + total.late + total.misses + total.cpu)
        stats.update(
            {
                "cached_tokens": runtime_stats.cached_tokens,
                "miss_policy": runtime.controller.miss
                + (" (host side on the GPU)" * runtime.host_side_mapped),
                "residency": runtime.controller.residency,
                "predictor_in_graph": runtime.controller.in_graph,
                # train --lead: MoE layers between a layer and the one whose activation predicts it
                "predictor_lead": min(runtime.controller.lead, len(runtime.bank.layers) - 1),
                "hits_per_token": round(total.hits / tokens, 3),
                "late_per_token": round(total.late / tokens, 3),
                "misses_per_token": round(total.misses / tokens, 3),
                "cpu_per_token": round(total.cpu / tokens, 3),
                "hit_rate": round(total.hits / selected, 4),
                # expert bytes the CPU read instead of uploading them (lru still uploads them later)
                "bytes_not_uploaded_per_token": round(
                    (miss.cpu_bytes - total.deferred_uploads * expert_bytes) / tokens
                ),
                "cpu_ms_per_expert": round(miss.cpu_ns * 1e-6 / max(1, miss.cpu_timed_experts), 4),
                "upload_ms_per_expert": round(
                    miss.upload_ns * 1e-6 * expert_bytes / max(1, bank["upload_bytes"]), 4
                ),
                "prefetch_issued": total.prefetch_issued,
                "prefetch_hits": total.prefetch_hits,
                "prefetch_wasted": total.prefetch_wasted,
                "prefetch_late": total.prefetch_late,
                "prediction_off_at_ubatch": runtime.controller.prediction_off_at,
                "lookahead_predictions": total.lookahead_predictions,
                "lookahead_superseded": total.lookahead_superseded,
                "prefetch_dropped": total.prefetch_dropped,
                "bytes_uploaded_per_token": round(bank["upload_bytes"] / tokens),
                "stall_ms_per_token": round(total.stall_s * 1e3 / tokens, 3),
                "predictor_ms_per_call": round(total.predictor_s * 1e3 / max(1, total.predictor_calls), 4),
                "forced_uploads": bank["forced_uploads"],
                # computed as stock computes them: every cached layer's bank full, nothing observed
                "quiet_ubatches": bank["quiet_ubatches"],
                "bank_bytes": bank["bank_bytes"],
                "pinned_bytes": bank["pinned_bytes"],
                # without a GPU the slot banks are host memory too: an "upload" is a memcpy in RAM
                "uploads_are_memory_copies": not engine.api.gpus(),
                **runtime.engine_counters(),
            }
        )
    return stats


def format_stats(stats: dict) -> str:
    lines = [
        f"prefill {stats['prompt_tokens']} tok at {stats['prefill_tok_s']:.1f} tok/s | decode "
        f"{stats['generated_tokens']} tok at {stats['decode_tok_s']:.1f} tok/s "
        f"(p50 {stats['ms_per_token_p50']:.2f} ms, p95 {stats['ms_per_token_p95']:.2f} ms)"
    ]
    if "hit_rate" in stats:
        lines.append(
            f"per token: {stats['hits_per_token']:.2f} hits, {stats['late_per_token']:.2f} late, "
            f"{stats['misses_per_token']:.2f} misses uploaded, {stats['cpu_per_token']:.2f} on the CPU "
            f"(hit rate {stats['hit_rate']:.1%}); "
            f"{format_bytes(stats['bytes_uploaded_per_token'])} uploaded, "
            f"{format_bytes(stats['bytes_not_uploaded_per_token'])} not (misses: {stats['miss_policy']}; "
            f"upload {stats['upload_ms_per_expert']:.3f} ms, CPU {stats['cpu_ms_per_expert']:.3f} ms "
            "per expert), "
            f"stall {stats['stall_ms_per_token']:.2f} ms\n"
            f"prefetches issued {stats['prefetch_issued']}, hit {stats['prefetch_hits']}, "
            f"wasted {stats['prefetch_wasted']}, too late {stats['prefetch_late']}, "
            f"over budget {stats['prefetch_dropped']} | " + predictor_place(stats) + " | "
            f"slot banks {format_bytes(stats['bank_bytes'])} | "
            + upload_source(stats)
            + (
                f" | {stats['quiet_ubatches']} ubatches with every expert resident ran as stock"
                if stats["quiet_ubatches"]
                else ""
            )
            + f"\nper token: {stats['host_syncs_per_token']:.1f} host synchronizations "
            f"({stats['eval_splits_per_token']:.1f} graph splits), "
            f"{stats['python_callbacks_per_token']:.1f} Python callbacks, "
            f"{stats['native_predictions_per_token']:.1f} predictions in the library "
            + (
                "(in the graph, not timed), "
                if stats.get("predictor_in_graph")
                else f"({stats['native_predictor_ms_per_token']:.3f} ms), "
            )
            + f"copies busy {stats['copy_busy_ms_per_token']:.3f} ms"
            + (f" (+{stats['async_uploads']} queued, not timed)" if stats["async_uploads"] else "")
            + f" | stale predictions dropped {stats['stale_predictions']}"
        )
    return "\n".join(lines)


def predictor_place(stats: dict) -> str:
    """Where the predictors ran: onnxruntime from Python (its time per call), the library, or nowhere;
    and how many layers ahead (train --lead)."""
    if stats["predictor_ms_per_call"]:
        return f"predictor {stats['predictor_ms_per_call']:.3f} ms/call in onnxruntime"
    lead = f", up to {stats['predictor_lead']} layers ahead" if stats.get("predictor_lead") else ""
    if stats.get("predictor_in_graph"):
        return "predictor in the model's graph" + lead
    return ("predictor in the library" + lead) if stats["native_predictions_per_token"] else "no predictor"


def upload_source(stats: dict) -> str:
    """What an upload is on this build: a copy within host RAM on the CPU build, else which host memory
    the device copies from."""
    if stats["uploads_are_memory_copies"]:
        return "CPU build: the slot banks are in RAM and an upload is a memory copy"
    if stats["pinned_bytes"]:
        return f"uploads from pinned host memory ({format_bytes(stats['pinned_bytes'])})"
    return "uploads from pageable host memory"


def format_layers(stats) -> str:
    rows = ["layer  tokens   hits   late  misses    cpu  issued  wasted  too_late  stall_ms  predictor_ms"]
    for il, c in sorted(stats.layers.items()):
        rows.append(
            f"{il:5d} {c.tokens:7d} {c.hits:6d} {c.late:6d} {c.misses:7d} {c.cpu:6d} {c.prefetch_issued:7d} "
            f"{c.prefetch_wasted:7d} {c.prefetch_late:9d} {c.stall_s * 1e3:9.2f} {c.predictor_s * 1e3:13.2f}"
        )
    return "\n".join(rows)
