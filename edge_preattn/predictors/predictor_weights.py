"""An exported predictor's weights as plain arrays, for the library's own evaluator (patch 12).

The library evaluates a predictor inside the pre-attention observation, where the activation is on
the host already, so a decode token needs no Python. It reads one shape of graph, the one `train`
exports: [Sub(mean) → Div(std)] → Gemm → [BatchNormalization] → SiLU or GELU → Gemm, i.e. Arch 2
and Arch 1 of `predictors.Predictor`, and with a router prior (`train --prior`, the residual
body(norm(x)) + scale · x·prior) the branch MatMul(x, prior) → Mul(scale) → Add to the body's
output (patch 16). History inputs (`train --features prev-layer,prev-token,prev-x`) come as a Concat of
x and them before the normalization: their columns of the first Gemm go to the library apart from x's,
and the library feeds them itself (patch 17; prev-x, the previous token's activation, patch 22). The
input normalization and the batch norm are folded into the first Gemm, the scale into the prior; a
low-rank first Linear (`train --rank`: two Gemms in a row) is multiplied back into one W1, so the
library holds the full matrix. Anything else (an int8 graph, another architecture) is refused with one
line saying why, and the runtime keeps onnxruntime for it. A read graph is checked against onnxruntime
on random rows (random history rows too) before the library gets it, so a misread graph cannot pass
for a predictor.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..interrupts import deferred
from . import features

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}  # LLAMA_EDGE_ACT_* in llama-edge.h
GRAPH_FEATURES = ("prev-router",)  # history inputs the library feeds in the model's graph only (patch 26)
CHECK_ROWS = 16
CHECK_TOLERANCE = 1e-3  # relative to the largest score: float32 sums in another order


class Unsupported(Exception):
    """The graph is not one the library evaluates; str() is the one-line reason."""


@dataclass(frozen=True)
class MlpWeights:
    """scores = w2 · act(w1 · [x, history] + b1) + b2 [+ prior_w · x] for one token's activation x
    [n_embd] and its history inputs ([n_expert] each, [n_embd] for prev-x, in `history` order)."""

    w1: np.ndarray  # [n_hidden, n_embd + Σ features.width(history)] float32
    b1: np.ndarray  # [n_hidden]
    activation: str  # a key of ACTIVATIONS
    w2: np.ndarray  # [n_expert, n_hidden]
    b2: np.ndarray  # [n_expert]
    prior_w: np.ndarray | None = None  # [n_expert, n_embd]: the router prior times its scale, on the raw x
    history: tuple[str, ...] = ()  # features.FEATURES names, the order of their columns after x's

    @property
    def n_embd(self) -> int:
        """The activation's width: W1's columns less the routing inputs', shared with the activation
        inputs (prev-x, prev-router) of the same width."""
        wide = sum(f in features.ACTIVATION_FEATURES for f in self.history)
        routing = self.w2.shape[0] * (len(self.history) - wide)
        return (self.w1.shape[1] - routing) // (1 + wide)

    def history_columns(self, feature: str) -> np.ndarray:
        """W1's columns [n_hidden, n_expert] ([n_hidden, n_embd] for prev-x, prev-router) that read one
        history input."""
        widths = [features.width(f, self.n_embd, self.w2.shape[0]) for f in self.history]
        index = self.history.index(feature)
        start = self.n_embd + sum(widths[:index])
        return np.ascontiguousarray(self.w1[:, start : start + widths[index]])

    def scores(self, x: np.ndarray, extra: dict | None = None) -> np.ndarray:
        """x [N, n_embd] and the history inputs {ONNX input name: [N, n_expert]} → [N, n_expert], in
        float64 (the check's reference)."""
        x = x.astype(np.float64)
        prior = 0.0 if self.prior_w is None else x @ self.prior_w.T.astype(np.float64)
        inputs = np.concatenate(
            [x, *(np.asarray((extra or {})[features.input_name(f)]) for f in self.history)], 1
        )
        h = inputs @ self.w1.T.astype(np.float64) + self.b1
        if self.activation == "silu":  # h · sigmoid(h), without overflow for large negative h
            h = h * np.exp(-np.logaddexp(0.0, -h))
        elif self.activation == "gelu":
            from math import erf, sqrt

            h = 0.5 * h * (1.0 + np.vectorize(erf)(h / sqrt(2.0)))
        else:
            h = 0.5 * h * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (h + 0.044715 * h**3)))
        return h @ self.w2.T.astype(np.float64) + self.b2 + prior


def _attribute(node, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            from onnx import helper

            return helper.get_attribute_value(attribute)
    return default


class _Graph:
    """A single-input chain of ONNX nodes, walked from `x` to `scores`."""

    def __init__(self, model) -> None:
        from onnx import numpy_helper

        self.constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = numpy_helper.to_array(_attribute(node, "value", None))
        self.nodes = [node for node in model.graph.node if node.op_type != "Constant"]
        self.inputs = [i.name for i in model.graph.input if i.name not in self.constants]
        self.consumers: dict[str, list] = {}
        self.producers = {name: node for node in self.nodes for name in node.output}
        for node in self.nodes:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def only_consumer(self, name: str):
        consumers = self.consumers.get(name, [])
        return consumers[0] if len(consumers) == 1 else None

    def constant(self, node, index: int) -> np.ndarray:
        if index >= len(node.input) or node.input[index] not in self.constants:
            raise Unsupported(f"{node.op_type} input {index} is not a constant")
        return self.constants[node.input[index]].astype(np.float64)


def _gemm(graph: _Graph, node) -> tuple[np.ndarray, np.ndarray]:
    """A Gemm y = x · Wᵀ + b (torch's Linear): (W [out, in], b [out])."""
    if node is None or node.op_type != "Gemm":
        raise Unsupported(f"expected a Linear (Gemm), found {getattr(node, 'op_type', 'nothing')}")
    if _attribute(node, "transA", 0) or not _attribute(node, "transB", 0):
        raise Unsupported("a Gemm that is not x · Wᵀ")
    alpha, beta = _attribute(node, "alpha", 1.0), _attribute(node, "beta", 1.0)
    return alpha * graph.constant(node, 1), beta * graph.constant(node, 2)


def _activation(graph: _Graph, z: str) -> tuple[str, str]:
    """The activation applied to tensor z: (its name, the tensor it outputs)."""
    consumers = graph.consumers.get(z, [])
    kinds = sorted(node.op_type for node in consumers)
    if kinds == ["Mul", "Sigmoid"]:  # SiLU: z · sigmoid(z)
        sigmoid = next(n for n in consumers if n.op_type == "Sigmoid")
        mul = next(n for n in consumers if n.op_type == "Mul")
        if graph.only_consumer(sigmoid.output[0]) is mul:
            return "silu", mul.output[0]
    if len(consumers) == 1 and consumers[0].op_type == "Gelu":  # opset 20
        approximate = _attribute(consumers[0], "approximate", b"none")
        return ("gelu_tanh" if approximate in (b"tanh", "tanh") else "gelu"), consumers[0].output[0]
    if kinds == ["Div", "Mul"]:  # torch's GELU at opset < 20: (z · (erf(z / √2) + 1)) · 0.5
        node = next(n for n in consumers if n.op_type == "Div")
        for expected in ("Erf", "Add", "Mul", "Mul"):
            node = graph.only_consumer(node.output[0])
            if node is None or node.op_type != expected:
                break
        else:
            return "gelu", node.output[0]
    raise Unsupported(f"an activation the library does not evaluate ({', '.join(kinds) or 'none'})")


def _prior(graph: _Graph, body: str) -> tuple[np.ndarray, object]:
    """The router prior added to the body's output `body`: scores = body + (x · prior) · scale.
    Returns (scale · priorᵀ [E, d], the prior's MatMul node)."""
    add = graph.only_consumer(body)
    if add is None or add.op_type != "Add" or list(add.output) != ["scores"] or len(add.input) != 2:
        raise Unsupported("more after the second Linear than a router prior (another architecture)")
    mul = graph.producers.get(add.input[1] if add.input[0] == body else add.input[0])
    if mul is None or mul.op_type != "Mul" or sum(name in graph.constants for name in mul.input) != 1:
        raise Unsupported("a branch beside the MLP that is not a scaled router prior")
    scale_index = 0 if mul.input[0] in graph.constants else 1
    matmul = graph.producers.get(mul.input[1 - scale_index])
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[0] != "x":
        raise Unsupported("a branch beside the MLP that is not x · prior")
    scale, prior = graph.constant(mul, scale_index), graph.constant(matmul, 1)
    single_use = graph.only_consumer(matmul.output[0]) is mul and graph.only_consumer(mul.output[0]) is add
    if scale.size != 1 or prior.ndim != 2 or not single_use:
        raise Unsupported("a router prior that is not one matrix times one scale")
    return prior.T * scale.item(), matmul


def read_mlp(path: Path) -> MlpWeights:
    """The weights of one exported predictor, normalization and batch norm folded in (and a router
    prior's scale into the prior)."""
    import onnx

    try:
        graph = _Graph(onnx.load(str(path)))
    except Exception as error:  # onnx raises its own types for a damaged file
        raise Unsupported(f"{path.name} is not readable as ONNX ({type(error).__name__})") from None
    extra = [name for name in graph.inputs if name != "x"]
    history = tuple(name.replace("_", "-") for name in extra)
    if not set(history) <= set(features.FEATURES):
        raise Unsupported(
            f"inputs beside x ({', '.join(extra)}) that the library does not feed need onnxruntime"
        )
    readers = graph.consumers.get("x", [])  # the body's first node, and the prior's MatMul if any
    body = [node for node in readers if node.op_type != "MatMul"]
    node = body[0] if len(body) == 1 else None
    source = "x"  # what the body reads: x, or x and the history inputs concatenated
    if extra:
        if node is None or node.op_type != "Concat" or list(node.input) != ["x", *extra]:
            raise Unsupported("history inputs that are not concatenated after x (another architecture)")
        if _attribute(node, "axis", 0) not in (1, -1):
            raise Unsupported("history inputs concatenated along another axis than the features")
        source = node.output[0]
        node = graph.only_consumer(source)
    shift, scale = None, None
    if node is not None and node.op_type == "Sub" and node.input[0] == source:  # InputNorm: (x − mean) / std
        shift = graph.constant(node, 1)
        node = graph.only_consumer(node.output[0])
        if node is None or node.op_type != "Div":
            raise Unsupported("an input normalization without its division")
        scale = 1.0 / graph.constant(node, 1)
        node = graph.only_consumer(node.output[0])
    w1, b1 = _gemm(graph, node)
    z = node.output[0]
    low_rank = graph.only_consumer(z)
    if low_rank is not None and low_rank.op_type == "Gemm":  # train --rank: W1 = B·A, b1 = B·a + b
        w_b, b_b = _gemm(graph, low_rank)
        w1, b1 = w_b @ w1, w_b @ np.broadcast_to(b1, w1.shape[:1]) + b_b
        z = low_rank.output[0]
    batch_norm = graph.only_consumer(z)
    if batch_norm is not None and batch_norm.op_type == "BatchNormalization":  # eval: per-channel affine
        gamma, beta, mean, var = (graph.constant(batch_norm, i) for i in (1, 2, 3, 4))
        factor = gamma / np.sqrt(var + _attribute(batch_norm, "epsilon", 1e-5))
        w1, b1 = w1 * factor[:, None], (b1 - mean) * factor + beta
        z = batch_norm.output[0]
    activation, h = _activation(graph, z)
    last = graph.only_consumer(h)
    w2, b2 = _gemm(graph, last)
    if graph.consumers.get("scores"):
        raise Unsupported("more after the scores (another architecture)")
    prior_w, prior_matmul = (None, None) if last.output[0] == "scores" else _prior(graph, last.output[0])
    if len(readers) != 1 + (prior_matmul is not None):
        raise Unsupported("x goes to more than the MLP and its router prior (another architecture)")
    if shift is not None:  # W1 · ((x − shift) · scale) + b1 = (W1 · scale) · x + (b1 − W1 · (shift · scale))
        shift, scale = np.broadcast_to(shift, w1.shape[1:]), np.broadcast_to(scale, w1.shape[1:])
        b1 = b1 - w1 @ (shift * scale)
        w1 = w1 * scale[None, :]
    return MlpWeights(
        w1=np.ascontiguousarray(w1, np.float32),
        b1=np.ascontiguousarray(np.broadcast_to(b1, w1.shape[:1]), np.float32),
        activation=activation,
        w2=np.ascontiguousarray(w2, np.float32),
        b2=np.ascontiguousarray(np.broadcast_to(b2, w2.shape[:1]), np.float32),
        prior_w=None if prior_w is None else np.ascontiguousarray(prior_w, np.float32),
        history=history,
    )


@deferred()  # Ctrl-C: after it, not inside onnx's import (its native init aborts the process)
def read_predictor_set(predictors) -> dict[int, MlpWeights]:
    """Every layer of an `onnx_io.PredictorSet`, checked against its onnxruntime session on random rows."""
    if predictors.int8 or getattr(predictors, "fp16", False):
        raise Unsupported(f"{'int8' if predictors.int8 else 'fp16'} predictors are evaluated by onnxruntime")
    names = {entry["layer"]: entry["file"] for entry in predictors.manifest["predictors"]}
    rng = np.random.default_rng(0)
    weights = {}
    n_embd, n_expert = predictors.n_embd, predictors.n_expert
    for il in predictors.layers:
        mlp = read_mlp(Path(predictors.directory) / names[il])
        prior_fits = mlp.prior_w is None or mlp.prior_w.shape == (n_expert, n_embd)
        width = n_embd + sum(features.width(f, n_embd, n_expert) for f in mlp.history)
        if mlp.w1.shape[1] != width or mlp.w2.shape[0] != n_expert or not prior_fits:
            raise Unsupported(f"layer {il}'s graph has other shapes than its manifest")
        if mlp.history != tuple(predictors.features):
            raise Unsupported(f"layer {il}'s graph reads other history inputs than its manifest names")
        x = rng.standard_normal((CHECK_ROWS, n_embd)).astype(np.float32)
        # probability rows (random points of the simplex), activations for prev-x, and some rows of zeros,
        # as the runtime feeds them
        extra = {
            features.input_name(f): (
                rng.standard_normal((CHECK_ROWS, n_embd))
                if f in features.ACTIVATION_FEATURES
                else rng.dirichlet(np.ones(n_expert), CHECK_ROWS)
            ).astype(np.float32)
            for f in mlp.history
        }
        for rows in extra.values():
            rows[: CHECK_ROWS // 4] = 0
        expected = predictors.scores(il, x, extra)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite weights: refused just below
            difference = np.abs(mlp.scores(x, extra) - expected).max()
        if not difference <= CHECK_TOLERANCE * max(1.0, float(np.abs(expected).max())):
            raise Unsupported(f"layer {il}'s graph read here differs from onnxruntime by {difference:.2e}")
        weights[il] = mlp
    return weights
