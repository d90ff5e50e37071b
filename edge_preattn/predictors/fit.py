"""One layer's predictor trained (`fit_layer`): AdamW with a cosine schedule, validation loss and
recall@k after every epoch, early stop, and a checkpoint per epoch that a rerun resumes from (read
back as tensors and plain data only). `train` runs it for every layer. Split from train.py, unchanged.
"""

import dataclasses
import logging
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import atomic_output
from . import metrics

log = logging.getLogger(__name__)

EVAL_CHUNK = 8192


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the trained weights: resuming requires the same settings."""

    arch: int = 2
    loss: str = "rank+distill"
    epochs: int = 8
    hidden: int = 128
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.01
    input: str = "x_pre"
    val_fraction: float = 0.15
    seed: int = 0
    max_train_samples: int | None = None
    patience: int = 2
    prior: bool = True  # a residual on the layer's router applied to the input (baselines.router_prior)
    features: str = ""  # history inputs, comma-separated (features.FEATURES)
    rank: int = 0  # > 0: the first Linear factorized through this many columns (networks.Predictor)
    lead: int = 0  # x_pre read this many MoE layers earlier (features.activation)

    def as_dict(self) -> dict:
        """The settings as stored in checkpoints and manifests; rank and lead only when set, so that
        runs written before they existed still resume."""
        fields = dataclasses.asdict(self)
        for optional in ("rank", "lead"):
            if not fields[optional]:
                del fields[optional]
        return fields


def val_recall(scores: np.ndarray, ids: np.ndarray) -> float:
    """Mean recall@k (metrics.recall_at_k, k = ids.shape[1]) of scores [N, E] against ids [N, k]."""
    return float(metrics.recall_at_k(metrics.ranked(scores, ids.shape[1]), ids).mean())


def _scores(model, x, extra: list):
    """The model's scores [M, E] on validation rows, in chunks (no gradients)."""
    import torch

    model.eval()
    with torch.no_grad():
        chunks = range(0, len(x), EVAL_CHUNK)
        return torch.cat(
            [model(x[i : i + EVAL_CHUNK], *(e[i : i + EVAL_CHUNK] for e in extra)) for i in chunks]
        )


def _evaluate(model, data: dict, loss_fn) -> tuple[float, float]:
    """(validation loss, validation recall@k) of the model on the validation prompts."""
    scores = _scores(model, data["x_val"], data["extra_val"])  # [M, E]
    loss = float(loss_fn(scores, data["probs_val"], data["ids_val_t"])) if len(scores) else 0.0
    return loss, val_recall(scores.cpu().numpy(), data["ids_val"])


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


def fit_layer(
    il: int, data: dict, settings: TrainSettings, *, gating: str, checkpoint: Path, prior=None, bar=None
):
    """Train (or resume, or reload when finished) one layer's predictor; returns (best model, history).

    `data` holds torch tensors on the training device: x_train [N, d], extra_train (a list of [N, E]
    history features), probs_train [N, E], ids_train [N, k], and the same for validation (x_val,
    extra_val, probs_val, ids_val_t), plus ids_val [M, k] as numpy (metrics.py reads it). `prior`
    [E, d]: the router prior the predictor is a residual on (None: none). The kept model is the one
    of the epoch with the lowest validation loss; training stops after `patience` epochs without a
    lower one.
    """
    import torch

    from .networks import Predictor, make_loss

    x_train, probs_train, ids_train = data["x_train"], data["probs_train"], data["ids_train"]
    extra_train = data["extra_train"]
    device = x_train.device
    torch.manual_seed(settings.seed * 1_000_003 + il * 1009)  # initial weights
    n_extra = sum(e.shape[1] for e in extra_train)
    model = Predictor(
        settings.arch,
        x_train.shape[1],
        probs_train.shape[1],
        settings.hidden,
        n_extra=n_extra,
        prior=prior,
        rank=settings.rank,
    ).to(device)
    model.norm.fit(torch.cat([x_train, *extra_train], dim=1) if extra_train else x_train)
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
    best = min((h["val_loss"] for h in state["history"]), default=float("inf"))
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
            logits = model(x_train[rows], *(e[rows] for e in extra_train))
            loss = loss_fn(logits, probs_train[rows], ids_train[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        val_loss, recall = _evaluate(model, data, loss_fn)
        state["history"].append(
            {
                "epoch": epoch,
                "train_loss": total / max(1, batches),
                "val_loss": val_loss,
                "val_recall_at_k": recall,
                "seconds": time.monotonic() - started,
            }
        )
        if val_loss < best:
            best, state["bad_epochs"] = val_loss, 0
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
    if state["best_model"] is None:  # every epoch's loss was NaN or infinite: nothing worth keeping
        raise UserError(
            f"layer {il}: training diverged (no finite validation loss): lower --lr (now {settings.lr})"
        )
    model.load_state_dict(state["best_model"])
    return model.eval(), state["history"]
