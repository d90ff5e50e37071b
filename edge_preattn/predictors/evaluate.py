"""`edge-preattn eval`: how good are the predictors, on prompts they never saw, beside the baselines.

The held-out prompts are either every prompt of a separately collected trace folder (`--heldout`,
the evaluation to trust: the validation prompts chose the training epoch), or the predictor set's
validation prompts (split by prompt at training), which only mean something in the very traces the
set was trained on: other traces are refused unless given as --heldout. The baselines run on exactly
the same tokens, and popularity counts only the training prompts of the training traces.
Every number comes from `metrics` (per token, then averaged per layer; layer means weigh each layer
equally). Writes `accuracy-<name>.json` (read by other tools), `accuracy-<name>.md` (the analogue of
the paper's Table 4) and two plots (figures 6-7's per-layer lines, a bar chart of the table).
"""

import argparse
import logging
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import what_is, write_bytes_atomic, write_json_atomic, write_text_atomic
from ..model.layout import read_layout
from ..traces.trace_set import TraceSet
from . import baselines, calibration, features, metrics
from .eval_report import calibration_markdown, markdown, reliability_png, write_reports

HELP = "measure predictor accuracy on held-out prompts beside cross-layer, popularity, prev-token and LRU"
EXAMPLES = """\
  edge-preattn eval traces/m predictors/m-arch2
  edge-preattn eval traces/m predictors/m-arch1 --arch2 predictors/m-arch2 --cross-layer predictors/m-xl
  edge-preattn eval traces/m predictors/m-arch2 -o bench/results --name moe-ref-a
  edge-preattn eval traces/m predictors/m --heldout traces/m-other-prompts   # every prompt of those
"""

log = logging.getLogger(__name__)

PHASES = {"prefill": 0, "decode": 1}
BATCH_ROWS = 8192  # rows per predictor call: bounds the float32 copy of the activations


def validation_prompts(manifest: dict) -> list[int]:
    """The prompt indices a predictor set was validated on (never trained on)."""
    for key in ("val_prompts", "validation_prompts"):
        if key in manifest:
            return sorted(int(p) for p in manifest[key])
    split = manifest.get("split", {})
    if "val_prompts" in split:
        return sorted(int(p) for p in split["val_prompts"])
    raise UserError(
        "the predictor manifest lists no validation prompts: retrain it with `edge-preattn train`"
    )


def load_set(directory: Path, fingerprint: str, int8: bool = False, fp16: bool = False):
    """A PredictorSet from onnx_io (its int8 or fp16 files if asked), refused unless it was trained on
    traces of this model."""
    from .onnx_io import load_predictor_set

    return load_predictor_set(directory, fingerprint=fingerprint, threads=1, int8=int8, fp16=fp16)


def _check(sets: dict, traces: TraceSet, heldout: TraceSet | None) -> tuple[list[int], tuple[int, ...]]:
    """Every set: this model, this k and E, the same validation prompts, layers that were collected;
    and, unless held-out traces are given, trained on exactly these traces (else their validation
    prompt indices would pick arbitrary prompts of another collection)."""
    from .train import traces_id

    val: list[int] | None = None
    layers: tuple[int, ...] = ()
    given = traces_id(traces)
    for name, pset in sets.items():
        if pset.manifest.get("fingerprint") != traces.fingerprint:
            raise UserError(
                f"{name} was trained on traces of another model than {traces.directory} "
                "(fingerprints differ): evaluate it on traces of its own model"
            )
        if (pset.k, pset.n_expert) != (traces.k, traces.n_expert):
            raise UserError(
                f"{name} predicts {pset.k} of {pset.n_expert} experts; the traces have "
                f"{traces.k} of {traces.n_expert}"
            )
        named = pset.manifest.get("traces_id")
        if named is not None and named != given and heldout is None:
            raise UserError(
                f"{traces.directory} are not the traces {name} was trained on (its manifest names "
                f"{pset.manifest.get('traces')}): pass those, and other traces as --heldout DIR"
            )
        if heldout is not None and named is not None and named == traces_id(heldout):
            raise UserError(f"--heldout {heldout.directory} holds the traces {name} was trained on")
        scored = heldout or traces
        missing = sorted(set(pset.layers) - set(scored.layers))
        if missing:
            raise UserError(
                f"{name} has predictors for layers {missing} that {scored.directory} did not collect"
            )
        if val is None:
            val, layers = validation_prompts(pset.manifest), tuple(pset.layers)
        elif validation_prompts(pset.manifest) != val and heldout is None:  # held-out: all its prompts
            raise UserError(f"{name} was validated on other prompts: train every set with the same split")
        elif tuple(pset.layers) != layers:
            raise UserError(f"{name} covers layers {list(pset.layers)}, the first set {list(layers)}")
    assert val is not None
    return val, layers


def set_inputs(pset, traces: TraceSet, il: int, rows: np.ndarray) -> tuple[np.ndarray, dict]:
    """What a predictor set reads for layer il on the given rows: (x [N, d], {input name: [N, E]})."""
    x = features.activation(traces, il, pset.manifest.get("input", "x_pre"), pset.manifest.get("lead", 0))
    extra = {
        features.input_name(f): features.history(traces, il, f)[rows]
        for f in pset.manifest.get("features") or ()
    }
    return x[rows], extra


def ranked_by(pset, il: int, x: np.ndarray, n: int, extra: dict | None = None) -> np.ndarray:
    """x: [N, n_embd] (any float type), extra: its history inputs → the predictor's ranked ids [N, n],
    scored in batches."""
    return metrics.ranked(set_scores(pset, il, x, extra), n)


def set_scores(pset, il: int, x: np.ndarray, extra: dict | None = None) -> np.ndarray:
    """The predictor's scores [N, E] on x [N, n_embd] and its history inputs, in batches."""
    parts = []
    for i in range(0, len(x), BATCH_ROWS):
        batch = x[i : i + BATCH_ROWS].astype(np.float32)
        if extra:  # only sets trained with history features take a second argument
            parts.append(pset.scores(il, batch, {name: a[i : i + BATCH_ROWS] for name, a in extra.items()}))
        else:
            parts.append(pset.scores(il, batch))
        if not np.isfinite(parts[-1]).all():  # ranked, NaN would pass for a real (poor) predictor
            raise UserError(
                f"{pset.directory}: layer {il}'s predictor gives NaN or infinite scores; retrain it"
            )
    return np.concatenate(parts) if parts else np.zeros((0, pset.n_expert), np.float32)


def _block(means: list[dict]) -> dict:
    """Per-layer lists, the mean over layers and the first layer, of per-layer means (`mean_of`)."""
    per_layer: dict = {name: [mean[name] for mean in means] for name in metrics.METRICS}
    for name in metrics.MARGIN_METRICS:
        per_layer[name] = {m: [mean[name][m] for mean in means] for m in means[0][name]}
    layer_mean = {
        name: {m: float(np.mean(v)) for m, v in value.items()}
        if isinstance(value, dict)
        else float(np.mean(value))
        for name, value in per_layer.items()
    }
    return {"per_layer": per_layer, "mean": layer_mean, "first_layer": means[0]}


def evaluate(
    traces: TraceSet, sets: dict, model: str, heldout: TraceSet | None = None, priors: dict | None = None
) -> dict:
    """The accuracy payload (the JSON) for predictor sets {name: PredictorSet} and every baseline.

    Scored: the validation prompts of `traces` (the sets' training traces), or, given `heldout`, every
    prompt of those traces. Popularity always counts the training prompts of `traces` only. `priors`
    ({layer: [E, d]}, baselines.router_prior on x_pre) adds the zero-training router-prior row.
    """
    val, layers = _check(sets, traces, heldout)
    meta = traces.meta()
    trained_on = ~np.isin(meta["prompt"], val)  # [N_train_traces] bool: the training prompts
    scored = heldout or traces
    scored_meta = meta if heldout is None else heldout.meta()
    held = ~trained_on if heldout is None else np.ones(len(scored_meta["prompt"]), bool)  # [N_all]
    if not held.any():
        raise UserError(f"none of the validation prompts {val[:8]}… are in {traces.directory}")
    if heldout is None:
        present = set(np.unique(meta["prompt"][held]).tolist())
        if len(present) < len(val):  # the report counts only the prompts it scored
            missing = [p for p in val if p not in present]
            log.warning(
                "%d of the %d validation prompts are not in %s (%s): scoring the other %d",
                len(missing), len(val), traces.directory, missing[:8], len(present),
            )  # fmt: skip
            val = sorted(present)
    if not trained_on.any():
        raise UserError(
            "every prompt of the traces is a validation prompt: no training tokens for popularity"
        )
    rows = np.flatnonzero(held)
    prompt, phase = scored_meta["prompt"][held], scored_meta["phase"][held]
    k, n_expert, n = traces.k, traces.n_expert, 2 * traces.k
    capacities = baselines.lru_capacities(k, n_expert)
    prior_rows = ["router-prior"] if priors else []
    names = [*sets, *prior_rows, "popularity", "prev-token", *(f"lru-{c}" for c in capacities), "oracle"]
    subsets = {name: phase == value for name, value in PHASES.items() if (phase == value).any()}
    # per method, per layer: {"all": means, "prefill": means, "decode": means} (per-token arrays dropped)
    results: dict[str, list[dict]] = {name: [] for name in names}

    def record(name: str, tree: dict) -> None:
        means = {"all": metrics.mean_of(tree)}
        means.update({subset: metrics.mean_of(tree, mask) for subset, mask in subsets.items()})
        results[name].append(means)

    for il in layers:
        true = scored.layer(il, "ids").astype(np.int64)[held]  # [N, k]
        train_ids = traces.layer(il, "ids").astype(np.int64)[trained_on]
        order = baselines.popularity_order(train_ids, n_expert)  # training prompts only
        for name, pset in sets.items():
            x, extra = set_inputs(pset, scored, il, rows)
            record(name, metrics.per_token(ranked_by(pset, il, x, n, extra), true, n_expert))
        if priors:
            x_pre = scored.layer(il, "x_pre")[held]  # [N, d] float16
            scores = np.concatenate(
                [
                    x_pre[i : i + BATCH_ROWS].astype(np.float32) @ priors[il].T
                    for i in range(0, len(x_pre), BATCH_ROWS)
                ]
            )  # [N, E]
            record("router-prior", metrics.per_token(metrics.ranked(scores, n), true, n_expert))
        record("popularity", metrics.per_token(baselines.popularity(order, len(true), n), true, n_expert))
        record("prev-token", metrics.per_token(baselines.prev_token(true, prompt, order, n), true, n_expert))
        for c in capacities:
            record(f"lru-{c}", baselines.lru(true, prompt, c))
        record("oracle", metrics.per_token(baselines.oracle(true, order, n), true, n_expert))
    methods = {}
    for name, per_layer in results.items():
        methods[name] = _block([means["all"] for means in per_layer])
        methods[name]["subsets"] = {
            subset: _block([means[subset] for means in per_layer]) for subset in subsets
        }
    return {
        "model": model,
        "fingerprint": traces.fingerprint,
        "k": k,
        "n_expert": n_expert,
        "moe_layers": list(layers),
        "heldout_tokens": int(held.sum()),
        "heldout_tokens_by_phase": {name: int((phase == value).sum()) for name, value in PHASES.items()},
        "heldout_prompts": val if heldout is None else sorted(int(p) for p in np.unique(prompt)),
        "heldout_traces": None if heldout is None else str(heldout.directory),
        "train_traces": str(traces.directory),
        "margins": list(metrics.margins(k)),
        "first_moe_layer": layers[0],
        "lru": "cache cleared at the start of each prompt; recall_at_k = hit rate, exact_set = no miss",
        "sources": {
            name: {
                key: pset.manifest.get(key)
                for key in ("arch", "loss", "input", "lead", "prior", "features", "hidden")
            }
            for name, pset in sets.items()
        },
        "methods": methods,
    }


ADAPTIVE_TARGETS = (0.8, 0.9, 0.95, 0.99, 1.0)


def calibrate(traces: TraceSet, pset, directory: Path) -> dict:
    """Fit each layer's temperature on the held-out tokens, store it in the set's manifest (what
    `run --mode adaptive` reads), and report the reliability and, per target recall, the experts
    per token that adaptive prefetch would upload and the recall it would reach (no cache)."""
    meta = traces.meta()
    held = np.isin(meta["prompt"], validation_prompts(pset.manifest))
    k = traces.k
    report: dict = {"layers": {}, "targets": {}}
    per_target = {target: {"experts": 0.0, "recall": []} for target in ADAPTIVE_TARGETS}
    for il in pset.layers:
        x, extra = set_inputs(pset, traces, il, np.flatnonzero(held))
        true = traces.layer(il, "ids").astype(np.int64)[held]  # [N, k]
        scores = set_scores(pset, il, x, extra)  # [N, E]
        temperature = calibration.fit_temperature(scores, true)
        order = np.argsort(-scores, axis=1, kind="stable")
        rank_of = np.argsort(order, axis=1)  # [N, E]: each expert's rank
        true_rank = np.take_along_axis(rank_of, true, axis=1)  # [N, k]
        layer = {
            "temperature": temperature,
            "reliability": calibration.reliability(scores, true, temperature),
        }
        for target, totals in per_target.items():
            counts = calibration.prefetch_counts(scores, k, temperature, target)  # [N]
            totals["experts"] += float(counts.mean())
            totals["recall"].append(float((true_rank < counts[:, None]).mean()))
        report["layers"][str(il)] = layer
    bytes_per_expert = None
    model = Path(traces.manifest.get("model", ""))
    if model.is_file():
        bytes_per_expert = max(layer.bytes_per_expert for layer in read_layout(model).moe_layers)
    for target, totals in per_target.items():
        report["targets"][str(target)] = {
            "experts_per_token": round(totals["experts"], 3),
            "recall": round(float(np.mean(totals["recall"])), 4),
            "bytes_per_token": None
            if bytes_per_expert is None
            else round(totals["experts"] * bytes_per_expert),
        }
    manifest = dict(pset.manifest)
    manifest["calibration"] = {
        il: {"temperature": layer["temperature"]} for il, layer in report["layers"].items()
    }
    write_json_atomic(directory / "predictors.json", manifest)
    return report


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("traces", help="trace folder written by `edge-preattn collect`")
    parser.add_argument("predictors", help="pre-attention predictor folder written by `edge-preattn train`")
    parser.add_argument(
        "--arch2", help="a second pre-attention predictor folder (e.g. the other architecture)"
    )
    parser.add_argument("--cross-layer", help="cross-layer (FATE-like) predictor folder, trained on x_prev")
    parser.add_argument(
        "-o", "--output", default="bench/results", help="output folder (default bench/results)"
    )
    parser.add_argument(
        "--heldout",
        help="trace folder collected from other prompts than TRACES: score all of its prompts "
        "(TRACES then only supplies the training prompts' popularity)",
    )
    parser.add_argument(
        "-m",
        "--model",
        help="the traces' GGUF, for the router-prior row (default: its path in the traces, if present)",
    )
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--int8", action="store_true", help="evaluate the int8 predictors (train --int8)")
    form.add_argument("--fp16", action="store_true", help="evaluate the fp16 predictors (train --fp16)")
    parser.add_argument("--name", help="name in the output files (default: the model file's stem)")
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="fit PREDICTORS' confidence on the held-out tokens (for run --mode adaptive), "
        "store it in its manifest, and report adaptive prefetch at several target recalls",
    )


def set_name(manifest: dict) -> str:
    """A predictor set's row name: preattn-arch2, cross-layer, with +prior and +feature suffixes."""
    if manifest.get("input", "x_pre") == "x_prev":
        name = "cross-layer"
    else:
        name = f"preattn-arch{manifest.get('arch', '?')}"
    return (
        name
        + (f"+lead{manifest['lead']}" if manifest.get("lead") else "")
        + ("+prior" if manifest.get("prior") else "")
        + "".join(f"+{f}" for f in manifest.get("features") or [])
    )


def prior_weights(traces: TraceSet, model: str | None, sets: dict) -> dict | None:
    """The router prior of the evaluated layers (baselines.router_prior), or None without the GGUF."""
    path = Path(model or traces.manifest.get("model") or "")
    if not path.is_file():
        if model:
            raise UserError(f"-m {model} not found")
        return None
    if read_layout(path).fingerprint != traces.fingerprint:
        raise UserError(f"{path} is not the model the traces were collected from: pass the right -m")
    layers = tuple(next(iter(sets.values())).layers)
    return baselines.router_prior(path, layers, "x_pre")


def main(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is {what_is(out)}: give a folder for the reports")
    if args.name is not None and (not args.name.strip() or "/" in args.name or "\0" in args.name):
        raise UserError(f"--name {args.name!r} must be a plain name (it is part of file names in -o)")
    traces = TraceSet(Path(args.traces))
    sets: dict = {}
    for directory, expected in (
        (args.predictors, "x_pre"),
        (args.arch2, "x_pre"),
        (args.cross_layer, "x_prev"),
    ):
        if directory is None:
            continue
        pset = load_set(Path(directory), traces.fingerprint, args.int8, args.fp16)
        found = pset.manifest.get("input", "x_pre")
        if found != expected:
            flag = "--cross-layer" if found == "x_prev" else "PREDICTORS or --arch2"
            raise UserError(f"{directory} reads {found}, not {expected}: pass it as {flag}")
        name = set_name(pset.manifest)
        while name in sets:
            name += "'"
        sets[name] = pset
    model = args.name or Path(traces.manifest.get("model", traces.directory.name)).stem
    heldout = TraceSet(Path(args.heldout)) if args.heldout else None
    if heldout is not None and heldout.fingerprint != traces.fingerprint:
        raise UserError(f"--heldout {args.heldout} holds traces of another model than {args.traces}")
    payload = evaluate(traces, sets, model, heldout, prior_weights(traces, args.model, sets))
    paths = write_reports(payload, Path(args.output), model)
    if args.calibrate:
        primary = next(iter(sets.values()))
        report = calibrate(traces, primary, Path(args.predictors))
        out = Path(args.output)
        write_json_atomic(out / f"calibration-{model}.json", report)
        write_text_atomic(out / f"calibration-{model}.md", calibration_markdown(report, model))
        write_bytes_atomic(out / f"calibration-{model}.png", reliability_png(report, model))
        paths += [out / f"calibration-{model}.{ext}" for ext in ("json", "md", "png")]
        print(calibration_markdown(report, model))
    print(markdown(payload))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
