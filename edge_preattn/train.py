"""`edge-preattn train`: one predictor per MoE layer from a trace set, exported to ONNX.

Validation holds out whole prompts (never single tokens: neighbouring tokens of one prompt are
near-duplicates), chosen from the seed; their indices go into the manifest so that evaluation uses
exactly the prompts the predictors never saw. AdamW with a cosine schedule, early stop on validation
recall@k. After each epoch a layer's state is checkpointed; rerunning the same command resumes.
"""

import argparse
import dataclasses
import json
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .collect import parse_layers
from .errors import UserError
from .files import atomic_output, what_is, write_json_atomic
from .traces import TraceSet

log = logging.getLogger(__name__)

RESUMABLE = True  # Ctrl-C keeps per-epoch checkpoints; the same command goes on from there
HELP = "train per-layer expert predictors on collected traces and export them to ONNX"
EXAMPLES = """\
  edge-preattn train traces/model -o predictors/model
  edge-preattn train traces/model --arch 1 --loss wbce --epochs 1 -o runs/arch1-wbce
  edge-preattn train traces/model --input x_prev -o predictors/model-cross-layer   # FATE-like baseline
  edge-preattn train traces/model --hidden 512 --int8 --layers 0-3 -o predictors/small
"""
EVAL_CHUNK = 8192


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights: resuming requires the same settings."""

    arch: int = 2
    loss: str = "rank"
    epochs: int = 30
    hidden: int = 2048
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    input: str = "x_pre"
    val_fraction: float = 0.15
    seed: int = 0
    max_train_samples: int | None = None
    patience: int = 5


def split_by_prompt(prompt: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, list[int]]:
    """(train mask per token, sorted validation prompt indices): whole prompts go to one side."""
    prompts = np.unique(prompt)
    if len(prompts) < 2:
        raise UserError("the traces hold a single prompt: collect at least two to hold one out")
    n_val = min(len(prompts) - 1, max(1, round(val_fraction * len(prompts))))
    val = sorted(int(p) for p in np.random.default_rng(seed).permutation(prompts)[:n_val])
    return ~np.isin(prompt, val), val


def val_recall(scores: np.ndarray, ids: np.ndarray) -> float:
    """Mean recall@k (metrics.recall_at_k, k = ids.shape[1]) of scores [N, E] against ids [N, k]."""
    return float(metrics.recall_at_k(metrics.ranked(scores, ids.shape[1]), ids).mean())


def _evaluate(model, x, ids: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        scores = torch.cat([model(x[i : i + EVAL_CHUNK]) for i in range(0, len(x), EVAL_CHUNK)])
    return val_recall(scores.cpu().numpy(), ids)  # scores: [M, E]


def _save(path: Path, state: dict) -> None:
    import torch

    with atomic_output(path) as temporary, open(temporary, "wb") as file:
        torch.save(state, file)  # through a Python file: a full disk is an OSError, not torch's


_CHECKPOINT_KEYS = {"epoch", "done", "history", "best_model", "bad_epochs", "model", "optimizer", "schedule"}


def _load_checkpoint(path: Path, device) -> dict | None:
    """A layer's checkpoint (tensors and plain data only: weights_only), or None when there is none
    or it cannot be read, in which case that layer starts again (one warning)."""
    import torch

    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, ValueError, EOFError, OSError, pickle.UnpicklingError) as error:
        state = error
    if not isinstance(state, dict) or not state.keys() >= _CHECKPOINT_KEYS:
        log.warning("%s is damaged (%s): training that layer from its start", path, str(state)[:200])
        return None
    return state


def fit_layer(il: int, data: dict, settings: TrainSettings, *, gating: str, checkpoint: Path, bar=None):
    """Train (or resume, or reload when finished) one layer's predictor; returns (best model, history).

    `data` holds torch tensors on the training device: x_train [N, d], probs_train [N, E],
    ids_train [N, k], x_val [M, d]; and ids_val [M, k] as numpy (metrics.py reads it).
    """
    import torch

    from .predictors import Predictor, make_loss

    x_train, probs_train, ids_train = data["x_train"], data["probs_train"], data["ids_train"]
    device = x_train.device
    torch.manual_seed(settings.seed * 1_000_003 + il * 1009)  # initial weights
    model = Predictor(settings.arch, x_train.shape[1], probs_train.shape[1], settings.hidden).to(device)
    model.norm.fit(x_train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = max(1, len(x_train) // settings.batch_size + (len(x_train) % settings.batch_size > 1))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    loss_fn = make_loss(settings.loss, gating)
    state = _load_checkpoint(checkpoint, device) or {
        "epoch": 0, "done": False, "history": [], "best_model": None, "bad_epochs": 0
    }  # fmt: skip
    if "model" in state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        if bar is not None:
            bar.update(settings.epochs if state["done"] else state["epoch"])
    best = max((h["val_recall_at_k"] for h in state["history"]), default=-1.0)
    while not state["done"]:
        epoch = state["epoch"] + 1
        started = time.monotonic()
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + il * 1009 + epoch)
        torch.manual_seed(settings.seed * 1_000_003 + il * 1009 + epoch)  # dropout draws
        order = torch.randperm(len(x_train), generator=generator).to(device)  # [N]
        model.train()
        total, batches = 0.0, 0
        for first in range(0, len(order), settings.batch_size):
            rows = order[first : first + settings.batch_size]  # [B]
            if len(rows) < 2:  # BatchNorm1d cannot train on one row
                continue
            loss = loss_fn(model(x_train[rows]), probs_train[rows], ids_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        recall = _evaluate(model, data["x_val"], data["ids_val"])
        state["history"].append(
            {
                "epoch": epoch,
                "train_loss": total / max(1, batches),
                "val_recall_at_k": recall,
                "seconds": time.monotonic() - started,
            }
        )
        if recall > best:
            best, state["bad_epochs"] = recall, 0
            state["best_model"] = {name: t.detach().clone() for name, t in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["done"] = epoch >= settings.epochs or state["bad_epochs"] >= settings.patience
        state.update(
            model=model.state_dict(), optimizer=optimizer.state_dict(), schedule=schedule.state_dict()
        )
        _save(checkpoint, state)
        if bar is not None:
            bar.update(settings.epochs - epoch + 1 if state["done"] else 1)
            bar.set_postfix(layer=il, epoch=epoch, val_recall=f"{recall:.4f}")
    model.load_state_dict(state["best_model"])
    return model.eval(), state["history"]


def _open_checkpoints(directory: Path, expected: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
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


def _layer_data(traces: TraceSet, il: int, source: str, rows: tuple, device) -> dict:
    """One layer's training and validation tensors on the device (validation ids stay numpy);
    rows = (train rows, validation rows), token indices of the trace set."""
    import torch

    train_rows, val_rows = rows

    x = traces.x_prev(il) if source == "x_prev" else traces.layer(il, "x_pre")  # [T, d] float16
    probs, ids = traces.layer(il, "probs"), traces.layer(il, "ids")  # [T, E] float16, [T, k] int16

    def tensor(array: np.ndarray, rows: np.ndarray, dtype) -> "torch.Tensor":
        return torch.from_numpy(np.ascontiguousarray(array[rows])).to(device, dtype)

    return {
        "x_train": tensor(x, train_rows, torch.float32),
        "probs_train": tensor(probs, train_rows, torch.float32),
        "ids_train": tensor(ids, train_rows, torch.int64),
        "x_val": tensor(x, val_rows, torch.float32),
        "ids_val": ids[val_rows].astype(np.int64),
    }


def train(
    traces_dir: Path,
    out_dir: Path,
    settings: TrainSettings,
    *,
    layers: tuple[int, ...] | None = None,
    int8: bool = False,
    device: str | None = None,
    progress: bool = True,
) -> dict:
    """Train, export and describe one predictor per layer; returns the written manifest."""
    import torch
    from tqdm import tqdm

    from . import onnx_io
    from .predictors import LOSSES

    if settings.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}")
    if settings.input not in ("x_pre", "x_prev"):
        raise UserError("--input must be x_pre or x_prev")
    traces = TraceSet(traces_dir)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise UserError(f"-o {out_dir} is {what_is(out_dir)}: give a folder for the predictors")
    layers = tuple(layers or traces.layers)
    missing = sorted(set(layers) - set(traces.layers))
    if missing:
        raise UserError(f"layers {missing} are not in the traces (collected: {list(traces.layers)})")
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
            "settings": dataclasses.asdict(settings),
        },
    )
    entries = []
    started = time.monotonic()
    bar = tqdm(total=len(layers) * settings.epochs, unit="epoch", disable=not progress)
    with bar:
        for il in layers:
            data = _layer_data(traces, il, settings.input, (train_rows, val_rows), device)
            checkpoint = checkpoints / f"layer-{il:03d}.pt"
            model, history = fit_layer(
                il, data, settings, gating=traces.gating, checkpoint=checkpoint, bar=bar
            )
            x_val = data["x_val"].cpu().numpy()  # [M, d]
            entry = onnx_io.export_layer(model.cpu(), out_dir, il, x_val)
            best = max(history, key=lambda h: h["val_recall_at_k"])
            entry["validation"] = {
                "recall_at_k_per_epoch": [h["val_recall_at_k"] for h in history],
                "train_loss_per_epoch": [h["train_loss"] for h in history],
                "seconds_per_epoch": [h["seconds"] for h in history],
                "best_recall_at_k": best["val_recall_at_k"],
                "best_epoch": best["epoch"],
            }
            if int8:
                quantized = entry["int8"] = onnx_io.quantize_layer(out_dir, il)
                fp32_scores = onnx_io.onnx_scores(out_dir / entry["file"], x_val)  # [M, E]
                int8_scores = onnx_io.onnx_scores(out_dir / quantized["file"], x_val)  # [M, E]
                quantized["fp32_val_recall_at_k"] = val_recall(fp32_scores, data["ids_val"])
                quantized["val_recall_at_k"] = val_recall(int8_scores, data["ids_val"])
            entries.append(entry)
    manifest = {
        "fingerprint": traces.fingerprint,
        "model": traces.manifest.get("model"),
        "model_name": Path(str(traces.manifest.get("model", ""))).name,
        "traces": str(traces.directory),
        "arch": settings.arch,
        "loss": settings.loss,
        "input": settings.input,
        "k": traces.k,
        "n_expert": traces.n_expert,
        "n_embd": traces.n_embd,
        "hidden": settings.hidden,
        "gating": traces.gating,
        "layers": list(layers),
        "validation_prompts": val_prompts,
        "train_tokens": len(train_rows),
        "validation_tokens": len(val_rows),
        "settings": {**dataclasses.asdict(settings), "device": device, "int8": int8},
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
    parser.add_argument("--loss", choices=("mse", "wbce", "focal", "rank"), default=defaults.loss)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--hidden", type=int, default=defaults.hidden, help="hidden width (default 2048)")
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
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="prompts held out")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--max-train-samples", type=int, help="train on at most this many tokens (default: all)"
    )
    parser.add_argument("--int8", action="store_true", help="also write int8 models (dynamic quantization)")
    parser.add_argument("--device", help="torch device (default cuda when available, else cpu)")


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
    if args.hidden > MAX_HIDDEN:
        raise UserError(f"--hidden {args.hidden} is above {MAX_HIDDEN}: predictors use hundreds to thousands")
    if not 0 < args.val_fraction < 1:
        raise UserError("--val-fraction must lie between 0 and 1")
    if not args.lr > 0 or args.weight_decay < 0:
        raise UserError("--lr must be above 0 and --weight-decay 0 or more")
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
    )
    manifest = train(
        Path(args.traces),
        Path(args.output),
        settings,
        layers=parse_layers(args.layers),
        int8=args.int8,
        device=args.device,
    )
    print(f"validation recall@{manifest['k']} on {len(manifest['validation_prompts'])} held-out prompts:")
    print("layer  epochs  epoch-1  best" + ("    int8" if args.int8 else ""))
    for entry in manifest["predictors"]:
        val = entry["validation"]
        line = f"{entry['layer']:5d}  {len(val['recall_at_k_per_epoch']):6d}  "
        line += f"{val['recall_at_k_per_epoch'][0]:.4f}   {val['best_recall_at_k']:.4f}"
        if "int8" in entry:
            line += f"  {entry['int8']['val_recall_at_k']:.4f}"
        print(line)
    mean = np.mean([e["validation"]["best_recall_at_k"] for e in manifest["predictors"]])
    print(
        f"mean best {mean:.4f}; {manifest['train_seconds']:.0f}s on {manifest['settings']['device']}; "
        f"wrote {args.output}/predictors.json"
    )
    return 0
