"""`edge-preattn train`: one predictor per MoE layer from a trace set, exported to ONNX.

Validation holds out whole prompts (never single tokens: neighbouring tokens of one prompt are
near-duplicates), chosen from the seed; their indices go into the manifest so that evaluation uses
exactly the prompts the predictors never saw. AdamW with a cosine schedule, early stop on validation
recall@k (fit.py). After each epoch a layer's state is checkpointed; rerunning the same command resumes.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import output_folder, what_is, write_json_atomic
from ..traces.collect import parse_layers
from ..traces.trace_set import TraceSet
from . import features
from .fit import TrainSettings, fit_layer, val_recall

RESUMABLE = True  # Ctrl-C keeps per-epoch checkpoints; the same command goes on from there
HELP = "train per-layer expert predictors on collected traces and export them to ONNX"
EXAMPLES = """\
  edge-preattn train traces/model -o predictors/model   # residual on the router prior, rank+distill
  edge-preattn train traces/model --no-prior --hidden 2048 --loss rank --epochs 30 -o predictors/paper
  edge-preattn train traces/model --arch 1 --loss wbce --epochs 1 -o runs/arch1-wbce
  edge-preattn train traces/model --input x_prev -o predictors/model-cross-layer   # FATE-like baseline
  edge-preattn train traces/model --hidden 512 --int8 --layers 0-3 -o predictors/small
  edge-preattn train traces/model --rank 32 --fp16 -o predictors/low-rank   # W1 through 32 columns
  edge-preattn train traces/model --features prev-token,prev-x,prev-router -o predictors/history

What the defaults cost (bench/results/accuracy-ablation-*.md): on a busy 2-core CPU with -t 1, about
4 s per epoch per layer for 90k training tokens of moe-ref-a (d 384, E 64): about 5 min in all for its
8 layers and 8 epochs (the old default, hidden 2048 for 30 epochs, took 1.5-2.5 h); under 3 min for
the packaged model's 7 layers. The paper's shape (--no-prior --hidden 2048) is about ten times the
arithmetic per epoch. Training uses the GPU when torch sees one.
"""


def split_by_prompt(prompt: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, list[int]]:
    """(train mask per token, sorted validation prompt indices): whole prompts go to one side."""
    prompts = np.unique(prompt)
    if len(prompts) < 2:
        raise UserError("the traces hold a single prompt: collect at least two to hold one out")
    n_val = min(len(prompts) - 1, max(1, round(val_fraction * len(prompts))))
    val = sorted(int(p) for p in np.random.default_rng(seed).permutation(prompts)[:n_val])
    return ~np.isin(prompt, val), val


def _open_checkpoints(directory: Path, expected: dict) -> None:
    output_folder(directory)
    path = directory / "settings.json"
    if path.is_file():
        try:
            found = json.loads(path.read_text())
        except ValueError:
            found = None
        if found != expected:
            raise UserError(
                f"{directory} holds checkpoints of another run (other traces or flags): rerun with the "
                "same flags to resume, or choose a new -o folder"
            )
    else:
        write_json_atomic(path, expected)


def _layer_data(traces: TraceSet, il: int, settings: TrainSettings, rows: tuple, device) -> dict:
    """One layer's training and validation tensors on the device (see fit_layer);
    rows = (train rows, validation rows), token indices of the trace set."""
    import torch

    train_rows, val_rows = rows
    x = features.activation(traces, il, settings.input, settings.lead)  # [T, d] float16
    probs, ids = traces.layer(il, "probs"), traces.layer(il, "ids")  # [T, E] float16, [T, k] int16
    extra = [features.history(traces, il, name) for name in features.parse(settings.features)]

    def tensor(array: np.ndarray, rows: np.ndarray, dtype) -> "torch.Tensor":
        return torch.from_numpy(np.ascontiguousarray(array[rows])).to(device, dtype)

    return {
        "x_train": tensor(x, train_rows, torch.float32),
        "extra_train": [tensor(e, train_rows, torch.float32) for e in extra],
        "probs_train": tensor(probs, train_rows, torch.float32),
        "ids_train": tensor(ids, train_rows, torch.int64),
        "x_val": tensor(x, val_rows, torch.float32),
        "extra_val": [tensor(e, val_rows, torch.float32) for e in extra],
        "probs_val": tensor(probs, val_rows, torch.float32),
        "ids_val_t": tensor(ids, val_rows, torch.int64),
        "ids_val": ids[val_rows].astype(np.int64),
    }


def traces_id(traces: TraceSet) -> str:
    """What identifies a trace collection (its prompts file, settings and shards), wherever the folder
    lies: `eval` refuses to take another collection's tokens for this one's validation prompts."""
    manifest = traces.manifest
    shards = [(s.get("name"), s.get("tokens"), s.get("prompts")) for s in manifest["shards"]]
    key = [traces.fingerprint, manifest.get("prompts_sha256"), manifest.get("settings"), shards]
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def router_priors(
    traces: TraceSet, layers: tuple[int, ...], settings: TrainSettings, model: Path | None
) -> dict:
    """{layer: prior [E, d]} on what each predictor reads (features.activation), from the model the
    traces came from (its path in the traces' manifest, or `model`), refused when that file is missing
    or another model."""
    from ..model.layout import read_layout
    from .baselines import router_prior

    model = Path(model or traces.manifest.get("model") or "")
    if not model.is_file():
        raise UserError(f"the router prior needs the model's GGUF ({model} not found): pass -m MODEL.gguf")
    if read_layout(model).fingerprint != traces.fingerprint:
        raise UserError(f"{model} is not the model {traces.directory} was collected from: pass the right -m")
    read_from = {il: features.source_layer(traces.layers, il, settings.lead) for il in layers}
    return router_prior(model, layers, settings.input, read_from)


def _export(model, out_dir: Path, il: int, data: dict, *, names: list[str], formats: tuple[str, ...]) -> dict:
    """Write one layer's ONNX file (and its fp16 / int8 variants); their validation recall beside."""
    from . import onnx_io

    x_val = data["x_val"].cpu().numpy()  # [M, d]
    extra = {name: e.cpu().numpy() for name, e in zip(names, data["extra_val"], strict=True)}  # [M, E] each
    entry = onnx_io.export_layer(model.cpu(), out_dir, il, x_val, extra)
    for form in formats:
        write = onnx_io.fp16_layer if form == "fp16" else onnx_io.quantize_layer
        written = entry[form] = write(out_dir, il)
        fp32_scores = onnx_io.onnx_scores(out_dir / entry["file"], x_val, extra=extra)  # [M, E]
        scores = onnx_io.onnx_scores(out_dir / written["file"], x_val, extra=extra)  # [M, E]
        written["fp32_val_recall_at_k"] = val_recall(fp32_scores, data["ids_val"])
        written["val_recall_at_k"] = val_recall(scores, data["ids_val"])
    return entry


def train(
    traces_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    *,
    layers: tuple[int, ...] | None = None,
    int8: bool = False,
    fp16: bool = False,
    device: str | None = None,
    model: Path | None = None,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Train, export and describe one predictor per layer; returns the written manifest.
    `threads`: torch's CPU threads (default torch's own: every core; on a machine shared with other
    work, 1 is often many times faster, since torch's threads wait on each other)."""
    import torch
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)

    from . import onnx_io
    from .networks import loss_names

    if not loss_names(settings.loss):
        raise UserError("--loss must be one of mse, wbce, focal, rank, distill, or a sum like rank+distill")
    if settings.input not in ("x_pre", "x_prev"):
        raise UserError("--input must be x_pre or x_prev")
    features.check_lead(settings.lead, features.parse(settings.features), settings.input)
    names = [features.input_name(f) for f in features.parse(settings.features)]
    traces = TraceSet(traces_dir)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"-o {out_dir} is {what_is(out_dir)}: give a folder for the predictors")
    layers = tuple(layers or traces.layers)
    missing = sorted(set(layers) - set(traces.layers))
    if missing:
        raise UserError(f"layers {missing} are not in the traces (collected: {list(traces.layers)})")
    priors = router_priors(traces, layers, settings, model) if settings.prior else {}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = traces.meta()
    train_mask, val_prompts = split_by_prompt(meta["prompt"], settings.val_fraction, settings.seed)
    train_rows, val_rows = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
    if settings.max_train_samples and len(train_rows) > settings.max_train_samples:
        picked = np.random.default_rng(settings.seed).choice(train_rows, settings.max_train_samples, False)
        train_rows = np.sort(picked)
    out_dir = Path(out_dir)
    checkpoints = out_dir / "checkpoints"
    _open_checkpoints(
        checkpoints,
        {
            "fingerprint": traces.fingerprint,
            "tokens": len(train_mask),
            "settings": settings.as_dict(),
        },
    )
    entries = []
    started = time.monotonic()
    formats = tuple(form for form, wanted in (("fp16", fp16), ("int8", int8)) if wanted)
    bar = tqdm(total=len(layers) * settings.epochs, unit="epoch", disable=not progress)
    with bar:
        for il in layers:
            data = _layer_data(traces, il, settings, (train_rows, val_rows), device)
            checkpoint = checkpoints / f"layer-{il:03d}.pt"
            prior = torch.from_numpy(priors[il]) if il in priors else None
            predictor, history = fit_layer(
                il, data, settings, gating=traces.gating, checkpoint=checkpoint, prior=prior, bar=bar
            )
            entry = _export(predictor, out_dir, il, data, names=names, formats=formats)
            entry["source_layer"] = features.source_layer(traces.layers, il, settings.lead)
            best = min(history, key=lambda h: h["val_loss"])
            entry["validation"] = {
                "recall_at_k_per_epoch": [h["val_recall_at_k"] for h in history],
                "train_loss_per_epoch": [h["train_loss"] for h in history],
                "val_loss_per_epoch": [h["val_loss"] for h in history],
                "seconds_per_epoch": [h["seconds"] for h in history],
                "best_recall_at_k": best["val_recall_at_k"],
                "best_epoch": best["epoch"],
            }
            entries.append(entry)
    manifest = {
        "fingerprint": traces.fingerprint,
        "model": traces.manifest.get("model"),
        "model_name": Path(str(traces.manifest.get("model", ""))).name,
        "traces": str(traces.directory),
        "arch": settings.arch,
        "loss": settings.loss,
        "input": settings.input,
        "lead": settings.lead,
        "prior": settings.prior,
        "features": list(features.parse(settings.features)),
        "traces_id": traces_id(traces),
        "k": traces.k,
        "n_expert": traces.n_expert,
        "n_embd": traces.n_embd,
        "hidden": settings.hidden,
        "rank": settings.rank,
        "gating": traces.gating,
        "layers": list(layers),
        "validation_prompts": val_prompts,
        "train_tokens": len(train_rows),
        "validation_tokens": len(val_rows),
        "settings": {**settings.as_dict(), "device": device, "int8": int8, "fp16": fp16},
        "parameters_per_layer": entries[0]["parameters"],
        "train_seconds": time.monotonic() - started,
        "predictors": entries,
    }
    onnx_io.write_manifest(out_dir, manifest)
    return manifest


MAX_HIDDEN = 65536  # a width beyond this exhausts memory before it helps a per-layer predictor


def add_args(parser: argparse.ArgumentParser) -> None:
    defaults = TrainSettings()
    parser.add_argument("traces", help="trace folder written by `edge-preattn collect`")
    parser.add_argument(
        "-o", "--output", required=True, help="predictors folder (resumes if it holds this run)"
    )
    parser.add_argument(
        "--arch", type=int, choices=(1, 2), default=defaults.arch, help="paper's architecture"
    )
    parser.add_argument(
        "--loss",
        default=defaults.loss,
        help="mse, wbce, focal, rank (the paper's), distill (soft targets), or a sum such as rank+distill",
    )
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument(
        "--hidden",
        type=int,
        default=defaults.hidden,
        help=f"hidden width (default {defaults.hidden}; the paper's 2048)",
    )
    parser.add_argument(
        "--rank",
        type=int,
        default=defaults.rank,
        help="factorize the first Linear through this many columns (low-rank; default 0: full). "
        "Sizes: bench/results/accuracy-size-*.md",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="epochs without gain")
    parser.add_argument("--layers", help="MoE layers to train, e.g. 0,3,5-7 (default all collected)")
    parser.add_argument(
        "--input",
        choices=("x_pre", "x_prev"),
        default=defaults.input,
        help="x_pre: pre-attention (the paper); x_prev: previous layer's router input (FATE-like)",
    )
    parser.add_argument(
        "--lead",
        type=int,
        default=defaults.lead,
        help="read the pre-attention state this many MoE layers earlier (the first layer's where there "
        "is none that far back), so that uploads can start that many layers ahead (default 0: the "
        "layer's own; the library feeds it, patch 24)",
    )
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="prompts held out")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--max-train-samples", type=int, help="train on at most this many tokens (default: all)"
    )
    parser.add_argument(
        "--prior",
        action=argparse.BooleanOptionalAction,
        default=defaults.prior,
        help="train a residual on the layer's own router applied to the input (needs the model's GGUF)",
    )
    parser.add_argument(
        "-m", "--model", help="the traces' GGUF for --prior (default: its path in the traces)"
    )
    parser.add_argument(
        "--features",
        default=defaults.features,
        help="history inputs, comma-separated: prev-layer (this token's routing at the previous MoE "
        "layer), prev-token (the previous token's routing at this layer), prev-x (the previous token's "
        "pre-attention state at this layer), prev-router (the previous token's router input at this "
        "layer; fed at run time with --predictor-device gpu only)",
    )
    parser.add_argument("--int8", action="store_true", help="also write int8 models (dynamic quantization)")
    parser.add_argument("--fp16", action="store_true", help="also write fp16-weight models")
    parser.add_argument("--device", help="torch device (default cuda when available, else cpu)")
    parser.add_argument(
        "-t", "--threads", type=int, help="CPU threads for torch (default all; 1 on a busy machine)"
    )


def check_device(name: str | None) -> None:
    """Refuse a torch device this machine lacks before any work (torch fails deep in the first layer)."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device: use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA GPU on this machine; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPUs")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: train runs on cpu or cuda")


def main(args: argparse.Namespace) -> int:
    if args.epochs < 1 or args.hidden < 1 or args.batch_size < 2:
        raise UserError("--epochs and --hidden must be at least 1, --batch-size at least 2")
    if args.rank < 0:
        raise UserError(f"--rank must be 0 (a full first Linear) or more, not {args.rank}")
    if args.hidden > MAX_HIDDEN:
        raise UserError(f"--hidden {args.hidden} is above {MAX_HIDDEN}: predictors use hundreds to thousands")
    if not 0 < args.val_fraction < 1:
        raise UserError("--val-fraction must lie between 0 and 1")
    if not args.lr > 0 or args.weight_decay < 0:
        raise UserError("--lr must be above 0 and --weight-decay 0 or more")
    if args.seed < 0:  # numpy's and torch's generators take non-negative seeds
        raise UserError(f"--seed must be 0 or more, not {args.seed}")
    if args.patience < 1 or (args.max_train_samples is not None and args.max_train_samples < 1):
        raise UserError("--patience and --max-train-samples must be at least 1")
    check_device(args.device)
    settings = TrainSettings(
        arch=args.arch,
        loss=args.loss,
        epochs=args.epochs,
        hidden=args.hidden,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        input=args.input,
        val_fraction=args.val_fraction,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        patience=args.patience,
        prior=args.prior,
        features=",".join(features.parse(args.features)),
        rank=args.rank,
        lead=args.lead,
    )
    manifest = train(
        Path(args.traces),
        Path(args.output),
        settings,
        layers=parse_layers(args.layers),
        int8=args.int8,
        fp16=args.fp16,
        device=args.device,
        model=Path(args.model) if args.model else None,
        threads=args.threads,
    )
    print(f"validation recall@{manifest['k']} on {len(manifest['validation_prompts'])} held-out prompts:")
    formats = [form for form in ("fp16", "int8") if getattr(args, form)]
    print("layer  epochs  epoch-1  best" + "".join(f"    {form}" for form in formats))
    for entry in manifest["predictors"]:
        val = entry["validation"]
        line = f"{entry['layer']:5d}  {len(val['recall_at_k_per_epoch']):6d}  "
        line += f"{val['recall_at_k_per_epoch'][0]:.4f}   {val['best_recall_at_k']:.4f}"
        line += "".join(f"  {entry[form]['val_recall_at_k']:.4f}" for form in formats)
        print(line)
    mean = np.mean([e["validation"]["best_recall_at_k"] for e in manifest["predictors"]])
    print(
        f"mean best {mean:.4f}; {manifest['train_seconds']:.0f}s on {manifest['settings']['device']}; "
        f"wrote {args.output}/predictors.json"
    )
    return 0
