"""Accuracy study on a trace set (issue 4's deliverable, steps 2-5): the Table 3 analogue, the
pre-attention minus cross-layer margin over seeds, and the data-size curve.

Stages (each reuses finished runs: `edge-preattn train` resumes from its checkpoints, so rerunning
this script, or running one stage at a time, costs only what is missing):

- table3: single-epoch validation recall@k (mean over layers) for 4 losses x 2 architectures
  (`--epochs 1`, seed 0: every run holds out the same prompts).
- full:   the best loss of table3 (highest mean of the two architectures) trained with --epochs for
  arch 1 and arch 2, and the cross-layer baseline (input x_prev) with the better of the two
  architectures and the same loss and budget, all seed 0. `edge-preattn eval` is then run by hand
  on these three folders (see the printed command).
- seeds:  for each seed, the pre-attention predictor (best arch/loss) and the cross-layer one, same
  seed (so the same held-out prompts, which change with the seed), --seed-epochs for every seed
  (when it equals --epochs, seed 0 reuses the full runs); both scored by `evaluate.evaluate` on
  that seed's held-out prompts; per-layer margin of recall@k (and recall@k+ceil(k/2), top-1) and
  its spread over seeds.
- limits: what bounds the accuracy, on seed 0's held-out prompts: how flat the router is (top-k
  probability mass, gap between the k-th and (k+1)-th probability), the router's own weights applied
  to the pre-attention activation (as if attention added nothing) and to x_prev, the best set's
  recall on training tokens (the generalization gap), and where its false positives rank in the
  router's order (near misses or not).
- curve:  validation recall@k (mean over layers and per layer) when training on at most N tokens
  (--max-train-samples), seed 0 (same held-out prompts), best arch/loss, --curve-epochs; sizes at or
  above the available training tokens are replaced by "all". The "all" run goes first, then the
  sizes from the largest down (the costly points first when time is short); also a PNG plot
  (recall@k vs training tokens, log x), with --curve-compare another study's curve beside it.

Writes <results>/<stem>-<name>.json and .md (stem "accuracy-study" by default). Run from the repo
root, e.g.:
    nice -n 10 python bench/accuracy_study.py /tmp/traces-ref --runs /tmp/study/runs --epochs 30 \
        --seeds 0 1 2 --seed-epochs 10 --int8
The data-size curve on a larger trace set, into its own file (bench/results/accuracy-curve-*.md
gives the collection commands; bench/merge_traces.py joins two collections of the same prompts):
    nice -n 19 python bench/accuracy_study.py /tmp/traces-ref-big --runs /tmp/curve/runs \
        --stem accuracy-curve --stages curve --loss wbce --arch 2 --curve-epochs 10 \
        --curve 10000 30000 100000 --curve-compare bench/results/accuracy-study-moe-ref-a.json
"""

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from edge_preattn.files import write_json_atomic, write_text_atomic
from edge_preattn.predictors import evaluate, onnx_io
from edge_preattn.predictors.train import TrainSettings, train
from edge_preattn.traces.trace_set import TraceSet

LOSSES = ("mse", "wbce", "focal", "rank")
ARCHS = (1, 2)
STAGES = ("table3", "full", "seeds", "curve", "limits")


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.traces_dir = Path(args.traces)
        self.runs = Path(args.runs)
        self.runs.mkdir(parents=True, exist_ok=True)
        self.path = Path(args.results) / f"{args.stem}-{args.name}.json"
        self.state: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def save(self) -> None:
        traces = TraceSet(self.traces_dir)
        totals = traces.manifest.get("totals", {})
        self.state.update(
            model=self.args.name,
            fingerprint=traces.fingerprint,
            traces=str(self.traces_dir),
            collected_tokens=totals,
            k=traces.k,
            n_expert=traces.n_expert,
            moe_layers=list(traces.layers),
        )
        write_json_atomic(self.path, self.state)
        write_text_atomic(self.path.with_suffix(".md"), markdown(self.state))
        if self.state.get("curve", {}).get("points"):
            png = curve_plot(self.state, self.args.curve_compare)
            if png:
                self.path.with_suffix(".png").write_bytes(png)

    def run(
        self,
        *,
        arch: int,
        loss: str,
        epochs: int,
        seed: int = 0,
        source: str = "x_pre",
        max_train: int | None = None,
        hidden: int | None = None,
        int8: bool = False,
    ) -> dict:
        """Train (or reuse) one predictor set; returns its manifest plus the wall seconds of this call."""
        hidden = hidden or self.args.hidden
        name = f"{source}-a{arch}-{loss}-e{epochs}-s{seed}-h{hidden}" + (
            f"-n{max_train}" if max_train else ""
        )
        directory = self.runs / name
        settings = TrainSettings(
            arch=arch,
            loss=loss,
            epochs=epochs,
            hidden=hidden,
            input=source,
            seed=seed,
            max_train_samples=max_train,
            patience=self.args.patience,
            prior=False,  # the paper's recipe (issue 4); issue 18's is bench/accuracy_ablation.py
        )
        manifest_path = directory / onnx_io.MANIFEST
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("settings", {}).get("epochs") == epochs:
                manifest["_dir"], manifest["_wall_s"] = str(directory), manifest.get("train_seconds")
                return manifest
        started = time.monotonic()
        print(f"[study] training {name}", flush=True)
        manifest = train(self.traces_dir, directory, settings, progress=self.args.progress, int8=int8)
        manifest["_dir"], manifest["_wall_s"] = str(directory), time.monotonic() - started
        print(
            f"[study] {name}: mean best val recall@k {mean_best(manifest):.4f} ({manifest['_wall_s']:.0f}s)",
            flush=True,
        )
        return manifest

    # stage 2 ------------------------------------------------------------------------------------
    def table3(self) -> None:
        cells = {}
        for arch in ARCHS:
            for loss in LOSSES:
                manifest = self.run(arch=arch, loss=loss, epochs=1)
                per_layer = [e["validation"]["recall_at_k_per_epoch"][0] for e in manifest["predictors"]]
                cells[f"arch{arch}/{loss}"] = {
                    "arch": arch,
                    "loss": loss,
                    "per_layer": per_layer,
                    "mean": float(np.mean(per_layer)),
                    "train_seconds": manifest["train_seconds"],
                    "dir": manifest["_dir"],
                }
                self.state["table3"] = {"epochs": 1, "seed": 0, "hidden": self.args.hidden, "cells": cells}
                self.save()
        by_loss = {loss: np.mean([cells[f"arch{a}/{loss}"]["mean"] for a in ARCHS]) for loss in LOSSES}
        self.state["table3"]["best_loss"] = max(by_loss, key=by_loss.get)
        self.state["table3"]["mean_over_archs"] = {loss: float(v) for loss, v in by_loss.items()}
        self.save()

    def best_loss(self) -> str:
        if self.args.loss:
            return self.args.loss
        if "table3" not in self.state or "best_loss" not in self.state["table3"]:
            raise SystemExit("run the table3 stage first (or give --loss)")
        return self.state["table3"]["best_loss"]

    # stage 3 ------------------------------------------------------------------------------------
    def full(self) -> None:
        loss, epochs = self.best_loss(), self.args.epochs
        int8 = self.args.int8
        runs = {f"preattn-arch{a}": self.run(arch=a, loss=loss, epochs=epochs, int8=int8) for a in ARCHS}
        best_arch = max(ARCHS, key=lambda a: mean_best(runs[f"preattn-arch{a}"]))
        runs["cross-layer"] = self.run(arch=best_arch, loss=loss, epochs=epochs, source="x_prev")
        self.state["full"] = {
            "loss": loss,
            "epochs": epochs,
            "patience": self.args.patience,
            "seed": 0,
            "hidden": self.args.hidden,
            "best_arch": best_arch,
            "runs": {name: summary(m) for name, m in runs.items()},
            "vs_cross_layer": self.compare(runs[f"preattn-arch{best_arch}"], runs["cross-layer"], epochs),
        }
        self.save()
        other = 3 - best_arch
        print(
            f"[study] evaluate: python -m edge_preattn.cli eval {self.traces_dir} "
            f"{runs[f'preattn-arch{best_arch}']['_dir']} --arch2 {runs[f'preattn-arch{other}']['_dir']} "
            f"--cross-layer {runs['cross-layer']['_dir']} -o {self.args.results} --name {self.args.name}"
        )

    def best_arch(self) -> int:
        if self.args.arch:
            return self.args.arch
        if "full" not in self.state:
            raise SystemExit("run the full stage first (or give --arch)")
        return self.state["full"]["best_arch"]

    # stage 4 ------------------------------------------------------------------------------------
    def compare(self, pre: dict, cross: dict, epochs: int) -> dict:
        """Pre-attention vs cross-layer on the pre-attention set's held-out prompts, per layer."""
        traces = TraceSet(self.traces_dir)
        sets = {
            "preattn": evaluate.load_set(Path(pre["_dir"]), traces.fingerprint),
            "cross-layer": evaluate.load_set(Path(cross["_dir"]), traces.fingerprint),
        }
        payload = evaluate.evaluate(traces, sets, self.args.name)
        methods = payload["methods"]
        entry = {
            "epochs": epochs,
            "heldout_tokens": payload["heldout_tokens"],
            "heldout_prompts": len(payload["heldout_prompts"]),
            "preattn_dir": pre["_dir"],
            "cross_dir": cross["_dir"],
        }
        for key, pick in compared_metrics(traces.k).items():
            a = np.array(pick(methods["preattn"]["per_layer"]))
            b = np.array(pick(methods["cross-layer"]["per_layer"]))
            entry[key] = {
                "preattn": a.tolist(),
                "cross_layer": b.tolist(),
                "margin": (a - b).tolist(),
                "preattn_mean": float(a.mean()),
                "cross_layer_mean": float(b.mean()),
                "margin_mean": float((a - b).mean()),
            }
        return entry

    def seeds(self) -> None:
        loss, arch = self.best_loss(), self.best_arch()
        per_seed = {}
        for seed in self.args.seeds:
            epochs = self.args.seed_epochs
            pre = self.run(arch=arch, loss=loss, epochs=epochs, seed=seed)
            cross = self.run(arch=arch, loss=loss, epochs=epochs, seed=seed, source="x_prev")
            per_seed[str(seed)] = self.compare(pre, cross, epochs)
            self.state["seeds"] = {"loss": loss, "arch": arch, "per_seed": per_seed}
            self.save()
        spread = {}
        for key in compared_metrics(TraceSet(self.traces_dir).k):
            margins = np.array([per_seed[s][key]["margin"] for s in per_seed])  # [seeds, layers]
            spread[key] = {
                "mean_per_layer": margins.mean(axis=0).tolist(),
                "std_per_layer": margins.std(axis=0, ddof=1).tolist() if len(margins) > 1 else None,
                "min_per_layer": margins.min(axis=0).tolist(),
                "max_per_layer": margins.max(axis=0).tolist(),
                "layer_mean_per_seed": margins.mean(axis=1).tolist(),
                "layers_nonnegative_per_seed": (margins >= 0).sum(axis=1).tolist(),
            }
        self.state["seeds"]["spread"] = spread
        self.save()

    # stage 5 ------------------------------------------------------------------------------------
    def curve(self) -> None:
        loss, arch, epochs = self.best_loss(), self.best_arch(), self.args.curve_epochs
        hidden = self.args.curve_hidden
        if self.args.curve_skip_all:  # only the --curve sizes (the split is the seed's, as in train)
            from edge_preattn.predictors.train import split_by_prompt

            everything = None
            meta_prompt = TraceSet(self.traces_dir).meta()["prompt"]
            train_mask, _ = split_by_prompt(meta_prompt, TrainSettings.val_fraction, 0)
            available = int(train_mask.sum())
        else:
            everything = self.run(arch=arch, loss=loss, epochs=epochs, hidden=hidden)  # fixes the split
            available = everything["train_tokens"]
        sizes = [size for size in sorted(set(self.args.curve)) if size < available]
        skipped = [size for size in sorted(set(self.args.curve)) if size >= available]
        points = []
        for size in [*([] if everything is None else [None]), *reversed(sizes)]:  # costly ones first
            manifest = (
                everything
                if size is None
                else self.run(arch=arch, loss=loss, epochs=epochs, max_train=size, hidden=hidden)
            )
            points.append(
                {
                    "max_train_samples": size,
                    "train_tokens": manifest["train_tokens"],
                    "validation_tokens": manifest["validation_tokens"],
                    "mean_best_recall_at_k": mean_best(manifest),
                    "per_layer": [e["validation"]["best_recall_at_k"] for e in manifest["predictors"]],
                    "epochs_run": [
                        len(e["validation"]["recall_at_k_per_epoch"]) for e in manifest["predictors"]
                    ],
                    "best_epoch": [e["validation"]["best_epoch"] for e in manifest["predictors"]],
                    "train_seconds": manifest["train_seconds"],
                    "dir": manifest["_dir"],
                }
            )
            if self.args.curve_also_on:
                points[-1]["also_on"] = self.heldout_recall(manifest["_dir"], self.args.curve_also_on)
            points.sort(key=lambda point: point["train_tokens"])
            self.state["curve"] = {
                "loss": loss,
                "arch": arch,
                "epochs": epochs,
                "patience": self.args.patience,
                "seed": 0,
                "hidden": self.args.curve_hidden or self.args.hidden,
                "torch_threads": self.args.threads,
                "validation_prompts": manifest["validation_prompts"],
                "all_trained": everything is not None,
                "command": "python bench/accuracy_study.py " + shlex.join(sys.argv[1:]),
                "also_on": self.args.curve_also_on,
                "points": points,
                "sizes_not_reached": skipped,
            }
            self.save()

    def heldout_recall(self, directory: str, traces_dir: str) -> dict:
        """recall@k of a trained set on another trace set of the same model, on the tokens of this
        set's validation prompts there (e.g. the shorter collection the earlier curve was made on)."""
        from edge_preattn.predictors import metrics

        other = TraceSet(Path(traces_dir))
        pset = evaluate.load_set(Path(directory), other.fingerprint)
        held = np.isin(other.meta()["prompt"], pset.manifest["validation_prompts"])
        per_layer = []
        for il in other.layers:
            x = other.layer(il, "x_pre")[held].astype(np.float32)
            ids = other.layer(il, "ids")[held].astype(np.int64)
            per_layer.append(
                float(metrics.recall_at_k(metrics.ranked(pset.scores(il, x), other.k), ids).mean())
            )
        return {
            "traces": traces_dir,
            "tokens": int(held.sum()),
            "per_layer": per_layer,
            "mean": float(np.mean(per_layer)),
        }

    # what limits accuracy -----------------------------------------------------------------------
    def limits(self) -> None:
        from edge_preattn.predictors import baselines, metrics

        traces = TraceSet(self.traces_dir)
        full = self.state.get("full")
        if not full:
            raise SystemExit("run the full stage first")
        best = full["runs"][f"preattn-arch{full['best_arch']}"]["dir"]
        pset = evaluate.load_set(Path(best), traces.fingerprint)
        meta = traces.meta()
        held = np.isin(meta["prompt"], pset.manifest["validation_prompts"])
        train_rows = np.random.default_rng(0).choice(
            np.flatnonzero(~held), min(8000, int((~held).sum())), False
        )
        model = Path(traces.manifest["model"])
        k, first = traces.k, traces.layers[0]
        on_x_pre = baselines.router_prior(model, traces.layers, "x_pre")  # {il: [E, d]}
        on_x_prev = baselines.router_prior(model, traces.layers, "x_prev")
        per_layer: dict = {}
        for il in traces.layers:
            ids = traces.layer(il, "ids").astype(np.int64)  # [T, k]
            probs = traces.layer(il, "probs")[held].astype(np.float32)  # [N, E]
            x_pre = traces.layer(il, "x_pre")  # [T, d]
            held_ids = ids[held]
            ordered = -np.sort(-probs, axis=1)
            gap = ordered[:, k - 1] - ordered[:, k]
            # the router on the pre-attention state, as if attention added nothing
            prior_scores = x_pre[held].astype(np.float32) @ on_x_pre[il].T
            row = {
                "router_topk_mass": float(ordered[:, :k].sum(axis=1).mean()),
                "router_gap_k_k1_median": float(np.median(gap)),
                "share_gap_below_0.002": float((gap < 2e-3).mean()),
                "router_on_x_pre_recall_at_k": float(
                    metrics.recall_at_k(metrics.ranked(prior_scores, k), held_ids).mean()
                ),
            }
            if il != first and il - 1 in traces.layers:
                x_prev = traces.layer(il - 1, "x_router")[held].astype(np.float32)
                row["router_on_x_prev_recall_at_k"] = float(
                    metrics.recall_at_k(metrics.ranked(x_prev @ on_x_prev[il].T, k), held_ids).mean()
                )
            predicted = metrics.ranked(pset.scores(il, x_pre[held].astype(np.float32)), k)  # [N, k]
            row["heldout_recall_at_k"] = float(metrics.recall_at_k(predicted, held_ids).mean())
            train_predicted = metrics.ranked(pset.scores(il, x_pre[train_rows].astype(np.float32)), k)
            row["train_recall_at_k"] = float(metrics.recall_at_k(train_predicted, ids[train_rows]).mean())
            key = probs.copy()
            np.put_along_axis(key, held_ids, probs.max() + 1 + np.take_along_axis(probs, held_ids, 1), 1)
            router_rank = np.argsort(np.argsort(-key, axis=1, kind="stable"), axis=1)  # [N, E], 0 = best
            wrong = np.take_along_axis(router_rank, predicted, 1)
            wrong = wrong[wrong >= k]  # router ranks of the false positives
            row["false_positives_router_rank_k+1_to_k+4"] = (
                float((wrong < k + 4).mean()) if wrong.size else 0.0
            )
            row["false_positives_router_rank_k+1_to_2k"] = (
                float((wrong < 2 * k).mean()) if wrong.size else 0.0
            )
            per_layer[str(il)] = row
        self.state["limits"] = {
            "predictors": best,
            "train_tokens_sampled": len(train_rows),
            "per_layer": per_layer,
        }
        self.save()


def compared_metrics(k: int) -> dict:
    """The per-layer metrics compared between pre-attention and cross-layer: name -> reader."""
    half = str(math.ceil(k / 2))
    return {
        "recall_at_k": lambda b: b["recall_at_k"],
        f"recall_at_k_plus_{half}": lambda b: b["recall_at_k_plus_m"][half],
        "top1": lambda b: b["top1"],
    }


def mean_best(manifest: dict) -> float:
    return float(np.mean([e["validation"]["best_recall_at_k"] for e in manifest["predictors"]]))


def summary(manifest: dict) -> dict:
    return {
        "dir": manifest["_dir"],
        "arch": manifest["arch"],
        "loss": manifest["loss"],
        "input": manifest["input"],
        "train_tokens": manifest["train_tokens"],
        "validation_tokens": manifest["validation_tokens"],
        "train_seconds": manifest["train_seconds"],
        "mean_best_recall_at_k": mean_best(manifest),
        "best_epoch_per_layer": [e["validation"]["best_epoch"] for e in manifest["predictors"]],
        "epochs_run_per_layer": [
            len(e["validation"]["recall_at_k_per_epoch"]) for e in manifest["predictors"]
        ],
        "best_recall_at_k_per_layer": [e["validation"]["best_recall_at_k"] for e in manifest["predictors"]],
    }


def curve_plot(state: dict, compare: list[str] | None = None) -> bytes | None:
    """PNG: best validation recall@k vs training tokens (log x): the layer mean, and each layer thin;
    with `compare` (other studies' JSON) their curves' means beside it, dashed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    curve, layers = state["curve"], state.get("moe_layers", [])
    tokens = [point["train_tokens"] for point in curve["points"]]
    figure = Figure(figsize=(9, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for index, il in enumerate(layers):
        values = [point["per_layer"][index] for point in curve["points"]]
        axes.plot(tokens, values, lw=0.8, alpha=0.6, marker=".", label=f"layer {il}")
    axes.plot(
        tokens,
        [point["mean_best_recall_at_k"] for point in curve["points"]],
        "k-o",
        lw=2.2,
        label=f"mean, ≤{curve['epochs']} epochs ({Path(state.get('traces', '')).name})",
    )
    for path, style in zip(compare or [], ("k--s", "b--^", "r--v", "g--d"), strict=False):
        other = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        if other.get("curve", {}).get("points"):
            axes.plot(
                [point["train_tokens"] for point in other["curve"]["points"]],
                [point["mean_best_recall_at_k"] for point in other["curve"]["points"]],
                style,
                lw=1.2,
                label=f"mean, ≤{other['curve']['epochs']} epochs ({Path(other.get('traces', '')).name})",
            )
    if curve.get("also_on"):
        axes.plot(
            tokens,
            [point["also_on"]["mean"] for point in curve["points"]],
            "k:o",
            lw=1.5,
            label=f"mean, same sets on {Path(curve['also_on']).name}'s held-out tokens",
        )
    axes.set_xscale("log")
    axes.set_xlabel("training tokens")
    axes.set_ylabel(f"best validation recall@{state.get('k')}")
    axes.set_title(
        f"{state.get('model')}: arch {curve['arch']}, loss {curve['loss']}, held-out prompts "
        f"({len(curve.get('validation_prompts', []))})"
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def markdown(state: dict) -> str:
    layers = state.get("moe_layers", [])
    totals = state.get("collected_tokens", {})
    lines = [
        f"# Accuracy study: {state.get('model')}",
        "",
        f"Traces `{state.get('traces')}`: {totals.get('tokens')} tokens ({totals.get('prefill_tokens')} "
        f"prefill, {totals.get('decode_tokens')} decode); k = {state.get('k')} of {state.get('n_expert')} "
        f"experts; MoE layers {layers}. recall@k in percent, validation prompts held out by prompt.",
    ]
    if "table3" in state:
        t3 = state["table3"]
        lines += [
            "",
            f"## Table 3 analogue: single-epoch validation recall@k (mean over layers), seed {t3['seed']}, "
            f"hidden {t3['hidden']}",
            "",
            "| architecture | " + " | ".join(LOSSES) + " |",
            "|---" * (len(LOSSES) + 1) + "|",
        ]
        for arch in ARCHS:
            cells = [t3["cells"].get(f"arch{arch}/{loss}") for loss in LOSSES]
            lines.append(f"| arch {arch} | " + " | ".join(_pct(c["mean"]) if c else "" for c in cells) + " |")
        if "best_loss" in t3:
            lines += ["", f"Best loss (mean of both architectures): **{t3['best_loss']}**."]
    if "full" in state:
        full = state["full"]
        lines += [
            "",
            f"## Full training: loss {full['loss']}, up to {full['epochs']} epochs (patience "
            f"{full['patience']}), seed 0",
            "",
            "| run | train tokens | mean best val recall@k | epochs run (per layer) | best epoch | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for name, run in full["runs"].items():
            lines.append(
                f"| {name} (arch {run['arch']}, {run['input']}) | {run['train_tokens']} | "
                f"{_pct(run['mean_best_recall_at_k'])} | {run['epochs_run_per_layer']} | "
                f"{run['best_epoch_per_layer']} | {run['train_seconds']:.0f} |"
            )
        lines += ["", f"Best architecture: arch {full['best_arch']}."]
        versus = full.get("vs_cross_layer")
        if versus:
            margin = versus["recall_at_k"]["margin"]
            lines += [
                "",
                f"Pre-attention minus cross-layer recall@k (points), this budget, {versus['heldout_tokens']} "
                "held-out tokens: "
                + ", ".join(f"L{il} {100 * m:+.2f}" for il, m in zip(layers, margin, strict=False))
                + f"; mean {100 * np.mean(margin):+.2f}",
            ]
    if "seeds" in state:
        seeds = state["seeds"]
        per_seed = seeds["per_seed"]
        lines += [
            "",
            f"## Pre-attention minus cross-layer (arch {seeds['arch']}, loss {seeds['loss']}), recall@k "
            "points per layer",
            "",
            "| seed | epochs | held-out tokens | " + " | ".join(f"L{il}" for il in layers) + " | mean |",
            "|---" * (len(layers) + 4) + "|",
        ]
        for seed, entry in per_seed.items():
            margin = entry["recall_at_k"]["margin"]
            lines.append(
                f"| {seed} | {entry['epochs']} | {entry['heldout_tokens']} | "
                + " | ".join(f"{100 * m:+.2f}" for m in margin)
                + f" | {100 * np.mean(margin):+.2f} |"
            )
        if "spread" in seeds:
            for key, spread in seeds["spread"].items():
                std = spread["std_per_layer"]
                lines += [
                    "",
                    f"{key} margin over seeds, per layer: mean ± std (min..max) points:",
                    "",
                    " · ".join(
                        f"L{il} {100 * m:+.2f}"
                        + (f" ± {100 * s:.2f}" if std else "")
                        + f" ({100 * lo:+.2f}..{100 * hi:+.2f})"
                        for il, m, s, lo, hi in zip(
                            layers,
                            spread["mean_per_layer"],
                            std or [0] * len(layers),
                            spread["min_per_layer"],
                            spread["max_per_layer"],
                            strict=False,
                        )
                    ),
                    "",
                    f"layers with margin ≥ 0, per seed: {spread['layers_nonnegative_per_seed']} of "
                    f"{len(layers)}; layer-mean margin per seed: "
                    + ", ".join(f"{100 * v:+.2f}" for v in spread["layer_mean_per_seed"]),
                ]
        lines += ["", "| seed | preattn recall@k | cross-layer recall@k |", "|---|---|---|"]
        for seed, entry in per_seed.items():
            lines.append(
                f"| {seed} | {_pct(entry['recall_at_k']['preattn_mean'])} | "
                f"{_pct(entry['recall_at_k']['cross_layer_mean'])} |"
            )
    if "limits" in state:
        rows = state["limits"]["per_layer"]
        names = list(dict.fromkeys(name for row in rows.values() for name in row))
        lines += [
            "",
            "## What limits accuracy (seed 0 held-out prompts; the best pre-attention set)",
            "",
            "| quantity | " + " | ".join(f"L{il}" for il in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
        ]
        for name in names:
            cells = [f"{rows[il][name]:.4f}" if name in rows[il] else "" for il in rows]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "router_on_x_pre: the router's own weights applied to the pre-attention activation rescaled "
            "to the router's norm (as if attention and the layer's input added nothing); router_on_x_prev: "
            "the same on the previous layer's router input; train_recall: the best set on "
            f"{state['limits']['train_tokens_sampled']} sampled training tokens; false positives: share "
            "of wrongly predicted experts that the router ranked k+1..k+4 (or k+1..2k).",
        ]
    if "curve" in state:
        curve = state["curve"]
        lines += [
            "",
            f"## Data-size curve: arch {curve['arch']}, loss {curve['loss']}, "
            f"up to {curve['epochs']} epochs, hidden {curve['hidden']}, seed 0 (same held-out prompts)",
            "",
            "| max train tokens | train tokens | held-out tokens | mean best val recall@k | "
            + " | ".join(f"L{il}" for il in layers)
            + " | epochs run (per layer) | seconds |",
            "|---" * (len(layers) + 6) + "|",
        ]
        for point in curve["points"]:
            lines.append(
                f"| {point['max_train_samples'] or 'all'} | {point['train_tokens']} | "
                f"{point['validation_tokens']} | {_pct(point['mean_best_recall_at_k'])} | "
                + " | ".join(_pct(v) for v in point["per_layer"])
                + f" | {point['epochs_run']} | {point['train_seconds']:.0f} |"
            )
        if curve.get("sizes_not_reached"):
            lines += ["", f"Not reached (fewer training tokens collected): {curve['sizes_not_reached']}."]
        if curve.get("all_trained") is False:
            lines += ["", "No point on all training tokens in this curve (--curve-skip-all)."]
        if curve.get("also_on"):
            lines += [
                "",
                f"The same predictor sets on the held-out prompts' tokens of `{curve['also_on']}` "
                "(recall@k, mean and per layer):",
                "",
                "| train tokens | held-out tokens | mean | " + " | ".join(f"L{il}" for il in layers) + " |",
                "|---" * (len(layers) + 3) + "|",
            ]
            for point in curve["points"]:
                also = point["also_on"]
                lines.append(
                    f"| {point['train_tokens']} | {also['tokens']} | {_pct(also['mean'])} | "
                    + " | ".join(_pct(v) for v in also["per_layer"])
                    + " |"
                )
        if curve.get("command"):
            lines += ["", f"Command: `{curve['command']}`"]
    if state.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in state["notes"]]
    return "\n".join([*lines, ""])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("traces", help="trace folder written by `edge-preattn collect`")
    parser.add_argument("--runs", default="runs/study", help="folder for the predictor sets trained here")
    parser.add_argument("--results", default="bench/results", help="where the study's JSON and .md go")
    parser.add_argument("--name", default="moe-ref-a")
    parser.add_argument("--stem", default="accuracy-study", help="results file name: <stem>-<name>.json")
    parser.add_argument("--curve-compare", nargs="+", help="other studies' JSON: their curves beside")
    parser.add_argument(
        "--curve-skip-all", action="store_true", help="curve: train only the --curve sizes, not 'all'"
    )
    parser.add_argument(
        "--curve-also-on", help="another trace folder: score each curve point on its held-out prompts too"
    )
    parser.add_argument("--note", action="append", help="a line for the results' notes (repeatable)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--epochs", type=int, default=30, help="full training (seed 0)")
    parser.add_argument("--patience", type=int, default=TrainSettings.patience)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--seed-epochs",
        type=int,
        help="epochs of every seed's runs (default: --epochs; then seed 0 reuses full)",
    )
    parser.add_argument("--curve", type=int, nargs="+", default=[10_000, 30_000, 100_000, 300_000])
    parser.add_argument("--curve-epochs", type=int, help="default: --epochs (then 'all' reuses full)")
    parser.add_argument("--hidden", type=int, default=2048, help="the paper's width (default 2048)")
    parser.add_argument("--curve-hidden", type=int, help="default: --hidden")
    parser.add_argument("--loss", help="skip table3's choice")
    parser.add_argument("--arch", type=int, choices=ARCHS, help="skip full's choice")
    parser.add_argument("--int8", action="store_true", help="train with --int8 (latency bench reads it)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--progress", action="store_true", help="progress bars")
    args = parser.parse_args()
    args.curve_epochs = args.curve_epochs or args.epochs
    args.seed_epochs = args.seed_epochs or args.epochs
    import torch

    torch.set_num_threads(args.threads)
    study = Study(args)
    if args.note:
        study.state["notes"] = args.note
    started = time.monotonic()
    for stage in STAGES:
        if stage in args.stages:
            stage_started = time.monotonic()
            getattr(study, stage)()
            study.state.setdefault("this_call_wall_seconds", {})[stage] = time.monotonic() - stage_started
            study.save()
            print(f"[study] stage {stage} done in {time.monotonic() - stage_started:.0f}s", flush=True)
    print(markdown(study.state))
    print(f"[study] {time.monotonic() - started:.0f}s; wrote {study.path} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
