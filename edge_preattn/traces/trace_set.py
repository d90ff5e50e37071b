"""Reading a trace set written by `collect`, and the proof that what it captured is the router's truth.

`verify_capture` recomputes, from the captured router input and the GGUF's own router weights
(dequantized with gguf-py), each token's gating and top-k, and compares them with the captured
ids and probabilities: if the hooks read the wrong tensor, the wrong layer or the wrong rows, this
fails.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .collect import FORMAT

META_FIELDS = ("tokens", "positions", "prompt", "phase")
NEAR_TIE = 2e-3  # gap between the k-th and (k+1)-th score below which float16 inputs may swap them


SHARD_NAME = re.compile(r"^shard-\d{5}$")  # what collect writes; anything else could leave the folder


class TraceSet:
    """A collected trace folder: per-shard, per-layer .npy arrays under manifest.json."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        path = self.directory / "manifest.json"
        if not path.is_file():
            raise UserError(
                f"{self.directory} has no manifest.json: is it a folder written by `edge-preattn collect`?"
            )
        try:
            self.manifest = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            raise UserError(f"{path} is not valid JSON: collect the traces again into a new folder") from None
        manifest = self.manifest if isinstance(self.manifest, dict) else {}
        if not str(manifest.get("format", FORMAT)).startswith(FORMAT):  # another writer's, or damaged
            raise UserError(f"{path} is not an {FORMAT} manifest: collect the traces again into a new folder")
        layout, settings, shards = (manifest.get(key) for key in ("layout", "settings", "shards"))
        if not isinstance(layout, dict) or not isinstance(settings, dict) or not isinstance(shards, list):
            raise _damaged(path, "the layout, settings or shard list")
        if not shards:
            raise UserError(
                f"{self.directory} holds no complete shard yet: run or resume `edge-preattn collect`"
            )
        if not all(isinstance(s, dict) and SHARD_NAME.match(str(s.get("name"))) for s in shards):
            raise _damaged(path, "a shard name")  # also keeps every read inside the folder
        self.fingerprint: str = _field(manifest, "fingerprint", str, path)
        if not isinstance(manifest.get("model", ""), str):  # a path that train and eval open
            raise _damaged(path, "the field 'model'")
        self.n_embd: int = _field(layout, "n_embd", int, path)
        self.n_expert: int = _field(layout, "n_expert", int, path)
        self.k: int = _field(layout, "n_expert_used", int, path)
        self.gating: str = _field(layout, "gating", str, path)
        layers = settings.get("layers") or _field(layout, "moe_layers", list, path)
        if not isinstance(layers, list) or not all(type(il) is int and il >= 0 for il in layers):
            raise _damaged(path, "the list of collected layers")
        self.layers: tuple[int, ...] = tuple(layers)

    def _load(self, name: str) -> np.ndarray:
        parts = []
        for shard in self.manifest["shards"]:
            path = self.directory / shard["name"] / f"{name}.npy"
            try:
                if path.exists() and not path.is_file():  # a FIFO: np.load would wait forever
                    raise OSError("not a regular file")
                parts.append(np.load(path, allow_pickle=False))
            except (OSError, ValueError, EOFError) as error:
                raise UserError(
                    f"{path} is missing or damaged ({error}); rerun collect (the same command): it redoes "
                    "damaged shards"
                ) from None
        shapes, dtypes = {part.shape[1:] for part in parts}, {part.dtype for part in parts}
        if len(shapes) > 1 or len(dtypes) > 1 or any(part.ndim == 0 for part in parts):
            raise UserError(
                f"{name}.npy differs in shape or type between the shards of {self.directory}: "
                "collect the traces again into a new folder"
            )
        return np.concatenate(parts)

    def meta(self) -> dict[str, np.ndarray]:
        """Per token: tokens, positions, prompt index, phase (0 prefill, 1 decode)."""
        return {name: self._load(name) for name in META_FIELDS}

    def layer(self, il: int, name: str) -> np.ndarray:
        """One captured array of MoE layer il: x_pre, x_router, probs, ids (or selection)."""
        if il not in self.layers:
            raise UserError(f"layer {il} was not collected (collected: {list(self.layers)})")
        return self._load(f"L{il:03d}.{name}")

    def x_prev(self, il: int) -> np.ndarray:
        """What a cross-layer predictor reads for layer il: the previous layer's router input,
        or for the first MoE layer the token embedding (stored at collection)."""
        stored = self.directory / self.manifest["shards"][0]["name"] / f"L{il:03d}.x_prev.npy"
        return self.layer(il, "x_prev") if stored.is_file() else self.layer(il - 1, "x_router")


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"{path}: {what} is damaged; collect the traces again into a new folder")


def _field(mapping: dict, key: str, kind: type, path: Path):
    value = mapping.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value <= 0):
        raise _damaged(path, f"the field {key!r}")
    return value


@dataclass(frozen=True)
class CaptureCheck:
    """How well captured routing agrees with a recomputation from the GGUF's router weights."""

    pairs: int  # (token, layer) pairs checked
    exact: int  # top-k sets equal
    near_ties: int  # differ, but only where the k-th and (k+1)-th recomputed scores nearly tie
    mismatches: int
    max_prob_error: float

    @property
    def match_rate(self) -> float:
        return self.exact / self.pairs if self.pairs else 0.0

    @property
    def match_rate_ties_excepted(self) -> float:
        decided = self.pairs - self.near_ties
        return self.exact / decided if decided else 0.0


def _gate(logits: np.ndarray, gating: str) -> np.ndarray:
    if gating == "softmax":
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    if gating == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    if gating == "softmax_weight":
        return logits
    raise UserError(f"no recomputation for gating function {gating!r}")


def verify_capture(
    traces: TraceSet, model: Path, max_tokens_per_layer: int = 2000, seed: int = 0
) -> CaptureCheck:
    """Recompute gating and top-k for a sample of tokens of every layer; compare with the capture."""
    import gguf

    from ..model.layout import read_layout

    if read_layout(model).fingerprint != traces.fingerprint:
        raise UserError(f"{traces.directory} was collected from another model than {model}")
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(model).tensors}
    rng = np.random.default_rng(seed)
    pairs = exact = near_ties = mismatches = 0
    max_prob_error = 0.0
    for il in traces.layers:
        router = tensors[f"blk.{il}.ffn_gate_inp.weight"]
        weight = gguf.dequantize(router.data, router.tensor_type).reshape(traces.n_expert, traces.n_embd)
        bias_tensor = tensors.get(f"blk.{il}.exp_probs_b.bias")
        bias = None if bias_tensor is None else np.asarray(bias_tensor.data, np.float32).reshape(-1)
        x = traces.layer(il, "x_router").astype(np.float32)  # [n_tokens, n_embd]
        ids = traces.layer(il, "ids")  # [n_tokens, k]
        probs = traces.layer(il, "probs").astype(np.float32)  # [n_tokens, n_expert]
        rows = rng.choice(len(x), size=min(max_tokens_per_layer, len(x)), replace=False)
        recomputed = _gate(x[rows] @ weight.T, traces.gating)  # [rows, n_expert]
        max_prob_error = max(max_prob_error, float(np.abs(recomputed - probs[rows]).max()))
        selection = recomputed + bias if bias is not None else recomputed
        order = np.argsort(-selection, axis=1, kind="stable")
        top = np.sort(order[:, : traces.k], axis=1)
        same = (top == np.sort(ids[rows].astype(np.int64), axis=1)).all(axis=1)
        sorted_scores = np.take_along_axis(selection, order, axis=1)
        gap = sorted_scores[:, traces.k - 1] - sorted_scores[:, traces.k]
        tie = ~same & (gap < NEAR_TIE)
        pairs += len(rows)
        exact += int(same.sum())
        near_ties += int(tie.sum())
        mismatches += int((~same & ~tie).sum())
    return CaptureCheck(
        pairs=pairs, exact=exact, near_ties=near_ties, mismatches=mismatches, max_prob_error=max_prob_error
    )
