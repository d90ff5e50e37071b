"""History inputs a predictor may read besides its activation (`train --features`).

Both exist at decode time before layer l's attention runs, so a predictor that reads them still
prefetches during that attention:

- `prev-layer`: this token's router probabilities at the previous MoE layer (routed before layer l
  started); zeros for the first MoE layer.
- `prev-token`: the previous token's router probabilities at this layer (routed one step earlier);
  zeros for the first token of a prompt. In a prefill batch the tokens route together, so this input
  is only a decode-time input (training uses it as the traces hold it).
- `prev-x`: the previous token's pre-attention state at this layer (what its own predictor read one
  step earlier), zeros for a prompt's first token: the attention this predictor cannot see mixes in
  earlier tokens, the previous one most of all. Unlike prev-token it exists for a prompt's tokens too
  (every row's pre-attention state is known when the predictor runs): the library feeds it there
  (patch 22).
- `prev-router`: the previous token's router input at this layer (its state after this layer's
  attention, normalized: what its router read), zeros for a prompt's first token. It carries the
  attention this predictor cannot see as the previous token saw it. Like prev-token it exists at decode
  time only (a prompt's rows reach the router together, after the predictor). The library feeds it in
  the model's graph (`--predictor-device gpu`, patch 26), where the router's input is a node it can copy
  without a host synchronization.

Each is [N, E] float16 ([N, d] for prev-x and prev-router), one row per trace token; the exported ONNX
graph takes them as inputs named like the feature with '_' for '-' (`prev_layer`, `prev_token`,
`prev_x`, `prev_router`), after `x`.

The activation itself (`activation`) is the layer's pre-attention state, or with a lead of D the
pre-attention state of the MoE layer D positions earlier (the first MoE layer's where there is none
that far back): a prediction made there can start its uploads D layers before the layer routes, and a
lead as deep as the model predicts every layer from the first one, as soon as a token's forward pass
starts. prev-layer does not exist that early and is refused with a lead; the previous token's inputs
(prev-token, prev-x, prev-router) do.
"""

import numpy as np

from ..errors import UserError
from ..traces.trace_set import TraceSet
from .baselines import first_of_prompt

FEATURES = ("prev-layer", "prev-token", "prev-x", "prev-router")
ACTIVATION_FEATURES = ("prev-x", "prev-router")  # d columns each; the others E


def parse(text: str | None) -> tuple[str, ...]:
    """`prev-layer,prev-token` → ("prev-layer", "prev-token") in FEATURES order; '' or None → ()."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = sorted(set(names) - set(FEATURES))
    if unknown:
        raise UserError(f"unknown --features {', '.join(unknown)}: choose from {', '.join(FEATURES)}")
    return tuple(name for name in FEATURES if name in names)


def input_name(feature: str) -> str:
    """The ONNX input that carries a feature."""
    return feature.replace("-", "_")


def width(feature: str, n_embd: int, n_expert: int) -> int:
    """Columns of a feature: d for prev-x and prev-router, E for the routing ones."""
    return n_embd if feature in ACTIVATION_FEATURES else n_expert


def source_layer(layers: tuple[int, ...], il: int, lead: int) -> int:
    """The MoE layer whose pre-attention state a predictor of layer il reads with this lead."""
    return layers[max(0, layers.index(il) - lead)]


def activation(traces: TraceSet, il: int, input_kind: str, lead: int = 0) -> np.ndarray:
    """What a predictor of layer il reads as x for every trace token: [N, d] float16 (module doc)."""
    if input_kind == "x_prev":
        return traces.x_prev(il)
    return traces.layer(source_layer(traces.layers, il, lead), "x_pre")


def check_lead(lead: int, names: tuple[str, ...], input_kind: str) -> None:
    """Refuse what a lead cannot read (module doc)."""
    if lead < 0:
        raise UserError(f"--lead must be 0 (the layer's own activation) or more, not {lead}")
    if lead and input_kind != "x_pre":
        raise UserError("--lead reads an earlier layer's pre-attention state: use it with --input x_pre")
    if lead and "prev-layer" in names:
        raise UserError(
            f"--lead {lead} with prev-layer: the previous layer's routing is not known {lead} layers "
            "ahead; use prev-token and prev-x"
        )


def history(traces: TraceSet, il: int, feature: str) -> np.ndarray:
    """One feature of layer il for every token of the traces: [N, E] or [N, d] float16 (module doc)."""
    if feature == "prev-layer":
        position = traces.layers.index(il)
        if position == 0:
            return np.zeros((len(traces.meta()["prompt"]), traces.n_expert), np.float16)
        return traces.layer(traces.layers[position - 1], "probs").astype(np.float16)
    if feature in ("prev-token", "prev-x", "prev-router"):
        array = {"prev-token": "probs", "prev-x": "x_pre", "prev-router": "x_router"}[feature]
        own = traces.layer(il, array).astype(np.float16)  # [N, ·]
        previous = np.zeros_like(own)
        previous[1:] = own[:-1]
        previous[first_of_prompt(traces.meta()["prompt"])] = 0
        return previous
    raise UserError(f"unknown feature {feature!r}: choose from {', '.join(FEATURES)}")
