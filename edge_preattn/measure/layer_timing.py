"""The paper's Table 1 analogue: per MoE layer, the time of the pre-attention norm, self-attention, the
post-attention norm, expert selection (router, softmax, top-k, weights) and expert computation
(expert matmuls and their weighted sum); shared experts and the residual add are a sixth column.
It is measured through the scheduler's eval callback: the graph of one decode step is read once to
classify every node by the `cb` name llama.cpp gives it, then the last node of each run of nodes of
one class is observed. For an observed node the scheduler computes the nodes since the previous
observation, synchronizes the backend and calls back: the segment's time runs from our "observe
this" answer (just before that launch) to the call after the synchronize. The same measurement on a
view node alone (no computation) is the overhead of one observation, and its median is subtracted
from every segment. Observing splits the graph, so kernels no longer overlap and CUDA graphs do not
apply: the report gives the mean step of a second context without the callback beside the
sum of the segments.
(`edge-preattn profile`, Table 1; split from profile.py, unchanged.)
"""

import re
import time

import numpy as np

from ..errors import UserError
from ..model.engine import Engine
from ..model.layout import MoeLayout
from .transfers import stats_ms

OP_CLASSES = (
    "pre_attn_norm",
    "self_attention",
    "post_attn_norm",
    "expert_selection",
    "expert_computation",
    "shared_and_residual",
)
SELECTION_PREFIXES = (
    "ffn_moe_logits",
    "ffn_moe_probs",
    "ffn_moe_argsort",
    "ffn_moe_topk",
    "ffn_moe_weights",
    "ffn_moe_group",
)
NO_OP_OPS = frozenset({"NONE", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE"})  # backends skip them
_LAYER_NAME = re.compile(r"^(.*)-(\d+)$")


def _parse(name: str) -> tuple[str, int | None]:
    """('ffn_moe_up', 3) for 'ffn_moe_up-3 (view)'; (name, None) for names without a layer."""
    head = name.split(" ", maxsplit=1)[0]
    match = _LAYER_NAME.match(head)
    return (match[1], int(match[2])) if match else (head, None)


def classify_nodes(nodes: list[tuple[str, str]], moe_layers: set[int]) -> list[tuple[int | None, str]]:
    """(layer, class) of every node of a decode graph, from llama.cpp's node names, in graph order.

    A layer is the span after the previous layer's last named node up to its own; inside an MoE layer
    the boundaries are the last nodes named exactly attn_norm-il, ffn_inp-il and ffn_norm-il, then
    router and top-k names are selection, other ffn_moe_* names expert computation, and the rest
    (shared experts, residual) the last column. View-like nodes take the class before them, unnamed
    computing nodes the class of the next named one.
    """
    parsed = [_parse(name) for name, _ in nodes]
    last_of: dict[int, int] = {}
    for index, (_, il) in enumerate(parsed):
        if il is not None:
            last_of[il] = index
    labels: list[tuple[int | None, str]] = [(None, "outside")] * len(nodes)
    start = next((i for i, (_, il) in enumerate(parsed) if il is not None), len(nodes))
    for il in sorted(last_of):
        span = range(start, last_of[il] + 1)
        start = span.stop
        if il not in moe_layers:
            labels[span.start : span.stop] = [(il, "dense_layer")] * len(span)
            continue
        last_named = {nodes[i][0]: i for i in span}
        bounds = [last_named.get(f"{boundary}-{il}", -1) for boundary in ("attn_norm", "ffn_inp", "ffn_norm")]
        kinds = []
        for index in span:
            (base, node_il), op = parsed[index], nodes[index][1]
            if index <= bounds[0]:
                kinds.append("pre_attn_norm")
            elif index <= bounds[1]:
                kinds.append("self_attention")
            elif index <= bounds[2]:
                kinds.append("post_attn_norm")
            elif op in NO_OP_OPS:
                kinds.append("inherit-previous")
            elif node_il is None:
                kinds.append("inherit-next")
            elif base.startswith(SELECTION_PREFIXES):
                kinds.append("expert_selection")
            elif base.startswith("ffn_moe_"):
                kinds.append("expert_computation")
            else:
                kinds.append("shared_and_residual")
        following = "shared_and_residual"
        for position in reversed(range(len(kinds))):  # unnamed computing nodes: the next named class
            if kinds[position] == "inherit-next":
                kinds[position] = following
            elif kinds[position] != "inherit-previous":
                following = kinds[position]
        for position, kind in enumerate(kinds):  # view-like nodes: the class before them
            if kind == "inherit-previous":
                kinds[position] = kinds[position - 1] if position else "pre_attn_norm"
        labels[span.start : span.stop] = [(il, kind) for kind in kinds]
    return labels


def observation_plan(
    labels: list[tuple[int | None, str]], ops: list[str], probe_layer: int
) -> tuple[list[int], int]:
    """The nodes to observe (the last of each run of one label) and a view node to time alone."""
    observed = {i for i in range(len(labels) - 1) if labels[i] != labels[i + 1]}
    candidates = [
        i for i, (il, _) in enumerate(labels) if il == probe_layer and ops[i] in NO_OP_OPS and i > 0
    ]
    if not candidates:
        raise UserError("found no view node to measure the observation overhead on; please report this model")
    probe = next((i for i in candidates if i - 1 in observed), candidates[len(candidates) // 2])
    observed |= {probe - 1, probe}
    return sorted(observed), probe


class NodeTimer:
    """The scheduler eval callback: counts nodes in graph order and times the observed segments."""

    def __init__(self, llama_cpp, ggml) -> None:
        self.ggml = ggml
        self.recording_names = False
        self.observed: frozenset[int] = frozenset()
        self.nodes: list[tuple[str, str]] = []
        self.counter = 0
        self.launched: dict[int, float] = {}
        self.done: dict[int, float] = {}
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._call)

    def start_step(self) -> None:
        self.counter, self.launched, self.done = 0, {}, {}
        self.nodes = []

    def _call(self, tensor, ask: bool, _user_data) -> bool:
        now = time.perf_counter()
        if not ask:
            self.done[self.counter - 1] = now
            return True
        index = self.counter
        self.counter += 1
        if self.recording_names:
            self.nodes.append(
                (self.ggml.ggml_get_name(tensor).decode(), self.ggml.ggml_op_desc(tensor).decode())
            )
            return False
        if index in self.observed:
            self.launched[index] = time.perf_counter()
            return True
        return False


def greedy_steps(engine: Engine, prompt: str, n_steps: int, before_step=None) -> list[float]:
    """Seconds of each of `n_steps` single-token greedy decodes after the prompt."""
    prompt_tokens = engine.tokenize(prompt)
    n_ctx = engine.llama_cpp.llama_n_ctx(engine.ctx)
    if len(prompt_tokens) + n_steps + 1 > n_ctx:
        raise UserError(f"the prompt and {n_steps} steps need more than -c {n_ctx} tokens; raise -c")
    engine.reset()
    engine.decode(prompt_tokens)
    seconds = []
    for step in range(n_steps):
        token = int(np.argmax(engine.last_logits()))
        if before_step is not None:
            before_step(step)
        started = time.perf_counter()
        engine.decode([token])
        engine.last_logits()  # waits for the step to finish
        seconds.append(time.perf_counter() - started)
    return seconds


def time_layer_ops(
    engine: Engine, timer: NodeTimer, layout: MoeLayout, prompt: str, n_tokens: int, *, warmup: int = 4
) -> dict:
    """Table 1 over `n_tokens` greedy decode steps after `warmup` unobserved ones and one that reads
    the graph's node names."""
    moe = {layer.index for layer in layout.moe_layers}
    per_step: list[dict[int, float]] = []
    plan: dict = {}

    def before_step(step: int) -> None:
        if step == warmup:  # this step records the names of the graph's nodes
            timer.recording_names = True
        elif step == warmup + 1:  # from here on, the chosen nodes are observed
            timer.recording_names = False
            plan["nodes"] = timer.nodes
            plan["labels"] = classify_nodes(timer.nodes, moe)
            observed, plan["probe"] = observation_plan(
                plan["labels"], [op for _, op in timer.nodes], sorted(moe)[len(moe) // 2]
            )
            plan["observed"] = observed
            timer.observed = frozenset(observed)
        elif step > warmup + 1:
            if timer.counter != len(plan["nodes"]) or not timer.done.keys() >= set(plan["observed"]):
                raise RuntimeError(
                    f"the decode graph changed ({timer.counter} nodes, was {len(plan['nodes'])})"
                )
            per_step.append({i: timer.done[i] - timer.launched[i] for i in plan["observed"]})
        timer.start_step()

    steps = greedy_steps(engine, prompt, warmup + 1 + n_tokens, before_step)
    before_step(warmup + 1 + n_tokens)  # collects the last step
    labels, probe, observed = plan["labels"], plan["probe"], plan["observed"]
    nodes = plan["nodes"]
    observed_seconds = steps[warmup + 1 :]
    timer.observed = frozenset()
    overhead = float(np.median([times[probe] for times in per_step]))
    # samples[class][layer] -> per-step seconds
    samples = {kind: {il: [] for il in sorted(moe)} for kind in OP_CLASSES}
    for times in per_step:
        sums: dict[tuple[int, str], float] = {}
        for index in observed:
            il, kind = labels[index]
            if index != probe and il in moe and kind in OP_CLASSES:
                sums[(il, kind)] = sums.get((il, kind), 0.0) + times[index] - overhead
        for (il, kind), seconds in sums.items():
            samples[kind][il].append(seconds)
    table = {}
    for kind in OP_CLASSES:
        pooled = [s for values in samples[kind].values() for s in values]
        table[kind] = {
            **(stats_ms(pooled) if pooled else {"mean_ms": None, "std_ms": None, "samples": 0}),
            "per_layer_mean_ms": {str(il): float(np.mean(v) * 1e3) for il, v in samples[kind].items() if v},
        }
    probe_ms = np.array([times[probe] for times in per_step]) * 1e3
    observed_ms = np.array(observed_seconds) * 1e3
    layer_sum = sum(table[kind]["mean_ms"] or 0.0 for kind in OP_CLASSES) * len(moe)
    return {
        "ops": table,
        "moe_layers": len(moe),
        "decode_steps": n_tokens,
        "graph_nodes": len(nodes),
        "observations_per_step": len(observed),
        "observation_overhead_ms": {"median": float(np.median(probe_ms)), "std": float(probe_ms.std())},
        "observed_step_ms": float(np.mean(observed_ms)),
        "moe_layers_sum_ms": layer_sum,
        "method": "host perf_counter in the scheduler's eval callback: each segment from the 'observe' "
        "answer before its launch to the callback after the backend synchronize, minus the median time "
        "of observing one view node alone; classes from llama.cpp node names",
    }
