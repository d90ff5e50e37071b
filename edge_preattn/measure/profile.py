"""`edge-preattn profile`: where a decode step's time goes per MoE layer, and what moving experts costs.

The paper's Table 1 analogue: per MoE layer, the time of the pre-attention norm, self-attention, the
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

The paper's Table 5 analogue: the time to load one expert and the router's k experts (up, gate and
down slices) from disk and from RAM into device memory, from pageable and from pinned host memory,
and the host→device bandwidth of one large copy. Copies go through ggml's backend API
(`ggml_backend_tensor_set` into a tensor of a device buffer, which returns once the copy is done);
pinned memory is the backend's host buffer type. "Disk" reads first drop the file's pages with
posix_fadvise(DONTNEED): where the OS ignores that, the read speed in the report shows it.
On a CPU-only build the GPU rows are marked not available and RAM→RAM memcpy is reported instead.
"""

import argparse
import ctypes
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import write_json_atomic, write_text_atomic
from ..model import native
from ..model.engine import Engine, EngineConfig
from ..model.layout import MoeLayout, read_layout
from ..units import format_bytes
from .machine import command_line, git_commit, machine_info

log = logging.getLogger(__name__)

HELP = "time each part of a MoE layer (Table 1) and expert loads disk/RAM → GPU (Table 5); JSON + markdown"
EXAMPLES = """\
  edge-preattn profile model.gguf
  edge-preattn profile model.gguf -n 100 --samples 100 -o bench/results
"""

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
GGML_TYPE_I8 = 24
GGML_DEVICE_TYPE_CPU = 0
BANDWIDTH_BYTES = 256 * 1024**2
WARMUP_STEPS = 4
_LAYER_NAME = re.compile(r"^(.*)-(\d+)$")


# --- host → device copies through ggml's backend API ------------------------------------------------


class _InitParams(ctypes.Structure):
    # struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _bind_ggml(api: native.NativeApi) -> ctypes.CDLL:
    base = api.ggml_base
    signatures = {
        # size_t ggml_tensor_overhead(void);
        "ggml_tensor_overhead": (ctypes.c_size_t, []),
        # struct ggml_context * ggml_init(struct ggml_init_params params);
        "ggml_init": (ctypes.c_void_p, [_InitParams]),
        # void ggml_free(struct ggml_context * ctx);
        "ggml_free": (None, [ctypes.c_void_p]),
        # struct ggml_tensor * ggml_new_tensor_1d(struct ggml_context * ctx, enum ggml_type type,
        #                                         int64_t ne0);
        "ggml_new_tensor_1d": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64]),
        # const char * ggml_get_name(const struct ggml_tensor * tensor);
        "ggml_get_name": (ctypes.c_char_p, [ctypes.c_void_p]),
        # const char * ggml_op_desc(const struct ggml_tensor * t);
        "ggml_op_desc": (ctypes.c_char_p, [ctypes.c_void_p]),
        # ggml_backend_buffer_t ggml_backend_buft_alloc_buffer(ggml_backend_buffer_type_t buft, size_t size);
        "ggml_backend_buft_alloc_buffer": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
        # void * ggml_backend_buffer_get_base(ggml_backend_buffer_t buffer);
        "ggml_backend_buffer_get_base": (ctypes.c_void_p, [ctypes.c_void_p]),
        # void ggml_backend_buffer_free(ggml_backend_buffer_t buffer);
        "ggml_backend_buffer_free": (None, [ctypes.c_void_p]),
        # enum ggml_status ggml_backend_tensor_alloc(ggml_backend_buffer_t buffer,
        #                                            struct ggml_tensor * tensor, void * addr);
        "ggml_backend_tensor_alloc": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]),
        # void ggml_backend_tensor_set(struct ggml_tensor * tensor, const void * data, size_t offset,
        #                              size_t size);
        "ggml_backend_tensor_set": (
            None,
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t],
        ),
        # ggml_backend_buffer_type_t ggml_backend_dev_host_buffer_type(ggml_backend_dev_t device);
        "ggml_backend_dev_host_buffer_type": (ctypes.c_void_p, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(base, name)
        function.restype, function.argtypes = restype, argtypes
    return base


def copy_target(api: native.NativeApi) -> native.Device:
    """The first GPU; on a CPU-only build the CPU device (copies are then RAM→RAM memcpy)."""
    gpus = api.gpus()
    if gpus:
        return gpus[0]
    return next(d for d in api.devices() if d.kind == GGML_DEVICE_TYPE_CPU)


class DeviceCopies:
    """One byte tensor in a buffer of `device`, and a pinned host buffer where the device has one.

    `upload` copies host bytes into the tensor with ggml_backend_tensor_set, which returns when the
    copy is complete (CUDA: an async copy on the per-thread stream, then a synchronize).
    """

    def __init__(self, api: native.NativeApi, device: native.Device, n_bytes: int) -> None:
        self.ggml = _bind_ggml(api)
        self.device, self.n_bytes = device, n_bytes
        self.ctx = self.buffer = self.host_buffer = None
        self.pinned: np.ndarray | None = None
        self.ctx = self.ggml.ggml_init(_InitParams(self.ggml.ggml_tensor_overhead() * 2, None, True))
        self.tensor = self.ggml.ggml_new_tensor_1d(self.ctx, GGML_TYPE_I8, n_bytes)
        self.buffer = self.ggml.ggml_backend_buft_alloc_buffer(
            api.ggml_base.ggml_backend_dev_buffer_type(device.handle), n_bytes
        )
        if not self.buffer:
            self.close()
            raise UserError(f"{device.name} could not allocate {format_bytes(n_bytes)} for the copy tests")
        status = self.ggml.ggml_backend_tensor_alloc(
            self.buffer, self.tensor, self.ggml.ggml_backend_buffer_get_base(self.buffer)
        )
        if status != 0:
            self.close()
            raise RuntimeError(f"ggml_backend_tensor_alloc failed with status {status}")
        host_type = self.ggml.ggml_backend_dev_host_buffer_type(device.handle)
        if host_type:
            self.host_buffer = self.ggml.ggml_backend_buft_alloc_buffer(host_type, n_bytes)
        if self.host_buffer:
            base = self.ggml.ggml_backend_buffer_get_base(self.host_buffer)
            self.pinned = np.ctypeslib.as_array((ctypes.c_uint8 * n_bytes).from_address(base))
            self.pinned[:] = 0  # fault every page in before timing

    def upload(self, source: np.ndarray, offset: int = 0) -> None:
        """Copy `source` (contiguous bytes in host memory) to the tensor at `offset`."""
        self.ggml.ggml_backend_tensor_set(self.tensor, source.ctypes.data, offset, source.nbytes)

    def close(self) -> None:
        for buffer in (self.host_buffer, self.buffer):
            if buffer:
                self.ggml.ggml_backend_buffer_free(buffer)
        if self.ctx:
            self.ggml.ggml_free(self.ctx)
        self.ctx = self.buffer = self.host_buffer = self.pinned = None

    def __enter__(self) -> "DeviceCopies":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _seconds(action, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return times


def measure_bandwidth(api: native.NativeApi, n_bytes: int = BANDWIDTH_BYTES, repeats: int = 5) -> dict:
    """Host→device bytes/s of one large copy (median of `repeats`), from pageable and pinned memory.

    On a CPU-only build the "device" is host RAM and the copy a memcpy.
    """
    device = copy_target(api)
    pageable = np.ones(n_bytes, dtype=np.uint8)  # written: every page is resident
    with DeviceCopies(api, device, n_bytes) as copies:
        copies.upload(pageable)  # warm-up (first-touch of the device buffer, driver setup)
        rates = {"pageable": n_bytes / float(np.median(_seconds(lambda: copies.upload(pageable), repeats)))}
        if copies.pinned is not None:
            pinned = copies.pinned
            copies.upload(pinned)
            rates["pinned"] = n_bytes / float(np.median(_seconds(lambda: copies.upload(pinned), repeats)))
    gpu = device.kind != GGML_DEVICE_TYPE_CPU
    return {
        "target": device.description if gpu else "host RAM (CPU-only build: memcpy)",
        "gpu": gpu,
        "transfer_bytes": n_bytes,
        "repeats": repeats,
        "pageable_bytes_per_s": rates["pageable"],
        "pinned_bytes_per_s": rates.get("pinned"),
    }


@dataclass(frozen=True)
class _Slice:
    offset: int  # in the file
    n_bytes: int


def expert_slices(layout: MoeLayout, layer_index: int, expert: int) -> list[_Slice]:
    """Where expert `expert` of MoE layer number `layer_index` lies in the file: one slice per tensor."""
    layer = layout.moe_layers[layer_index]
    return [_Slice(t.expert_offset(expert), t.bytes_per_expert) for t in layer.tensors]


def _drop_from_page_cache(fd: int, slices: list[_Slice]) -> None:
    for piece in slices:
        os.posix_fadvise(fd, piece.offset, piece.n_bytes, os.POSIX_FADV_DONTNEED)


def _stats_ms(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"mean_ms": float(ms.mean()), "std_ms": float(ms.std()), "samples": len(ms)}


def time_expert_loads(api: native.NativeApi, layout: MoeLayout, samples: int, seed: int = 0) -> dict:
    """Table 5: one expert and k experts from disk and from RAM, pageable and pinned, into the device."""
    log.info("timing expert loads (%d samples per row)", samples)
    k = layout.n_expert_used
    per_expert = max(layer.bytes_per_expert for layer in layout.moe_layers)
    rng = np.random.default_rng(seed)
    picks = [
        [(il, int(e)) for e in rng.choice(layout.n_expert, size=k, replace=False)]
        for il in rng.integers(0, len(layout.moe_layers), size=samples)
    ]  # per sample, k distinct experts of one layer; the first is the single-expert sample
    device = copy_target(api)
    gpu = device.kind != GGML_DEVICE_TYPE_CPU
    target = "GPU" if gpu else "RAM"
    file_map = np.memmap(layout.path, dtype=np.uint8, mode="r")
    fd = os.open(layout.path, os.O_RDONLY)
    rows: dict[str, dict] = {}
    try:
        with DeviceCopies(api, device, k * per_expert) as copies:
            staging = np.empty(k * per_expert, dtype=np.uint8)  # pageable read buffer

            def load(experts: list[tuple[int, int]], source: str, host: str) -> float:
                """Seconds to bring `experts` into the device from `source` (disk|ram) via `host` memory."""
                slices = [s for il, e in experts for s in expert_slices(layout, il, e)]
                if source == "disk":
                    _drop_from_page_cache(fd, slices)
                buffer = copies.pinned if host == "pinned" else staging
                if source == "ram" and host == "pinned":  # the experts already live in pinned memory
                    position = 0
                    for piece in slices:
                        buffer[position : position + piece.n_bytes] = file_map[
                            piece.offset : piece.offset + piece.n_bytes
                        ]
                        position += piece.n_bytes
                started = time.perf_counter()
                position = 0
                for piece in slices:
                    if source == "disk":
                        view = buffer[position : position + piece.n_bytes]
                        if os.preadv(fd, [memoryview(view)], piece.offset) != piece.n_bytes:
                            raise RuntimeError(f"short read from {layout.path}")
                        copies.upload(view, position)
                    elif host == "pinned":
                        copies.upload(buffer[position : position + piece.n_bytes], position)
                    else:  # pageable RAM: the file's pages in the page cache, through the mmap
                        copies.upload(file_map[piece.offset : piece.offset + piece.n_bytes], position)
                    position += piece.n_bytes
                return time.perf_counter() - started

            for source in ("ram", "disk"):
                if source == "ram":  # RAM rows read resident pages: touch them once
                    for experts in picks:
                        for piece in (s for il, e in experts for s in expert_slices(layout, il, e)):
                            staging[: piece.n_bytes] = file_map[piece.offset : piece.offset + piece.n_bytes]
                for host in ("pageable", "pinned"):
                    name = f"{'disk' if source == 'disk' else 'RAM'} → {target} ({host})"
                    if host == "pinned" and copies.pinned is None:
                        rows[name] = {
                            "available": False,
                            "why": f"{device.name} has no pinned host buffer type",
                        }
                        continue
                    one = [load(experts[:1], source, host) for experts in picks]
                    several = [load(experts, source, host) for experts in picks]
                    rows[name] = {
                        "available": True,
                        "one_expert": _stats_ms(one),
                        "k_experts": _stats_ms(several),
                        "bytes_per_expert": per_expert,
                        "k_bytes_per_s": k * per_expert / float(np.mean(several)),
                    }
            read_seconds = []
            for experts in picks[: min(10, samples)]:
                slices = [s for il, e in experts for s in expert_slices(layout, il, e)]
                _drop_from_page_cache(fd, slices)
                started = time.perf_counter()
                for piece in slices:
                    os.preadv(fd, [memoryview(staging[: piece.n_bytes])], piece.offset)
                read_seconds.append(time.perf_counter() - started)
    finally:
        os.close(fd)
    if not gpu:
        for source in ("disk", "ram"):
            for host in ("pageable", "pinned"):
                rows[f"{'disk' if source == 'disk' else 'RAM'} → GPU ({host})"] = {
                    "available": False,
                    "why": "CPU-only build",
                }
    return {
        "target": device.description,
        "k": k,
        "samples": samples,
        "rows": rows,
        "disk_read_bytes_per_s": k * per_expert / float(np.mean(read_seconds)),
        "note": "disk rows drop the experts' pages with posix_fadvise(DONTNEED) before each sample; "
        "a disk read speed near RAM speed means the OS kept them cached",
    }


# --- Table 1: per-layer op times through the eval callback ------------------------------------------


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
            **(_stats_ms(pooled) if pooled else {"mean_ms": None, "std_ms": None, "samples": 0}),
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


# --- the verb -----------------------------------------------------------------------------------------


def _table1_lines(t1: dict) -> list[str]:
    lines = [
        f"## Per MoE layer, one decode step (Table 1 analogue; {t1['decode_steps']} steps × "
        f"{t1['moe_layers']} layers)",
        "",
        "| operation | mean ms | std ms | samples |",
        "|---|---:|---:|---:|",
    ]
    for kind in OP_CLASSES:
        row = t1["ops"][kind]
        if row["samples"]:
            name = kind.replace("_", " ")
            lines.append(f"| {name} | {row['mean_ms']:.4f} | {row['std_ms']:.4f} | {row['samples']} |")
    return [
        *lines,
        "",
        f"Observation overhead subtracted: {t1['observation_overhead_ms']['median']:.4f} ms per segment "
        f"({t1['observations_per_step']} observations per step). Decode step (mean): "
        f"{t1['plain_step_ms']:.3f} ms plain, {t1['observed_step_ms']:.3f} ms observed; "
        f"MoE layers' segments sum to {t1['moe_layers_sum_ms']:.3f} ms.",
        f"Method: {t1['method']}.",
    ]


def _table5_lines(t5: dict) -> list[str]:
    lines = [
        f"## Expert loads (Table 5 analogue; k = {t5['k']}, {t5['samples']} samples, into {t5['target']})",
        "",
        "| source → target (host memory) | 1 expert ms | k experts ms | GB/s (k) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in t5["rows"].items():
        if not row["available"]:
            lines.append(f"| {name} | n/a ({row['why']}) | | |")
            continue
        one, several = row["one_expert"], row["k_experts"]
        lines.append(
            f"| {name} | {one['mean_ms']:.3f} ± {one['std_ms']:.3f} | {several['mean_ms']:.3f} ± "
            f"{several['std_ms']:.3f} | {row['k_bytes_per_s'] / 1e9:.2f} |"
        )
    per_expert = max(row.get("bytes_per_expert", 0) for row in t5["rows"].values())
    return [
        *lines,
        "",
        f"Bytes per expert: {format_bytes(per_expert)}; disk read "
        f"{t5['disk_read_bytes_per_s'] / 1e9:.2f} GB/s ({t5['note']}).",
    ]


def _bandwidth_lines(bandwidth: dict) -> list[str]:
    pinned = bandwidth["pinned_bytes_per_s"]
    return [
        f"Host → {bandwidth['target']}: {bandwidth['pageable_bytes_per_s'] / 1e9:.2f} GB/s pageable"
        + (f", {pinned / 1e9:.2f} GB/s pinned" if pinned else ", pinned n/a")
        + f" ({format_bytes(bandwidth['transfer_bytes'])} copies, median of {bandwidth['repeats']})."
    ]


def markdown(report: dict) -> str:
    gpus = ", ".join(g["name"] or "?" for g in report["machine"]["gpus"]) or "no GPU"
    lines = [f"# profile: {report['model']}", "", f"{report['build']} · {report['machine']['cpu']} · {gpus}"]
    for key, render in (
        ("table1", _table1_lines),
        ("table5", _table5_lines),
        ("bandwidth", _bandwidth_lines),
    ):
        lines.append("")
        if "error" in report[key]:
            lines.append(f"{key}: failed: {report[key]['error']}")
        else:
            lines += render(report[key])
    lines += ["", f"Command: `{report['command']}` · commit {report['commit']}"]
    return "\n".join(lines) + "\n"


def _measured(what: str, measure) -> dict:
    """One table; a failure is reported in its place so that the other tables are still written."""
    try:
        return measure()
    except (UserError, RuntimeError, OSError, ValueError) as error:
        log.warning("%s failed: %r", what, error)
        return {"error": repr(error)}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL.gguf", help="the MoE GGUF to profile")
    parser.add_argument("-p", "--prompt", default="def fibonacci(n):", help="prompt before the timed steps")
    parser.add_argument(
        "-n", "--n-predict", type=int, default=64, help="timed decode steps (>= 50; default 64)"
    )
    parser.add_argument("--samples", type=int, default=50, help="expert-load samples per row (default 50)")
    parser.add_argument("-c", "--ctx-size", type=int, default=512, help="context size (default 512)")
    parser.add_argument("-t", "--threads", type=int, help="CPU threads (default: llama.cpp's choice)")
    parser.add_argument(
        "-ngl", "--n-gpu-layers", type=int, default=-1, help="layers on the GPU (default all)"
    )
    parser.add_argument("-o", "--output", default=".", help="folder for profile-<model>.json/.md (default .)")


def main(args: argparse.Namespace) -> int:
    if args.n_predict < 50:
        raise UserError(
            f"-n {args.n_predict}: the tables need at least 50 samples per layer; use -n 50 or more"
        )
    if args.samples < 1:
        raise UserError("--samples must be at least 1")
    out_dir = Path(args.output)
    if not out_dir.is_dir():
        raise UserError(f"output folder {out_dir} does not exist")
    layout = read_layout(args.model)
    llama_cpp = native.load_llama(native.find_library())
    api = native.NativeApi(llama_cpp)
    timer = NodeTimer(llama_cpp, _bind_ggml(api))

    def with_callback(params) -> None:
        params.cb_eval = timer.callback

    config = EngineConfig(
        str(args.model), n_ctx=args.ctx_size, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers
    )

    def table1() -> dict:
        with Engine(llama_cpp, config) as engine:  # no callback: the step time without observation
            plain_ms = np.array(greedy_steps(engine, args.prompt, WARMUP_STEPS + args.n_predict)) * 1e3
        with Engine(llama_cpp, config, context_params_hook=with_callback) as engine:
            log.info("timing layer operations over %d decode steps", args.n_predict)
            table = time_layer_ops(engine, timer, layout, args.prompt, args.n_predict, warmup=WARMUP_STEPS)
        return {**table, "plain_step_ms": float(np.mean(plain_ms[WARMUP_STEPS:]))}

    report = {
        "model": Path(args.model).name,
        "machine": machine_info(),
        "build": api.build_info(),
        "library": os.environ.get("LLAMA_CPP_LIB_PATH"),
        "commit": git_commit(Path(__file__).resolve().parent),
        "command": command_line(),
        "table1": _measured("table 1", table1),
        "table5": _measured("table 5", lambda: time_expert_loads(api, layout, args.samples)),
        "bandwidth": _measured("bandwidth", lambda: measure_bandwidth(api)),
    }
    stem = f"profile-{Path(args.model).stem}"
    write_json_atomic(out_dir / f"{stem}.json", report)
    text = markdown(report)
    write_text_atomic(out_dir / f"{stem}.md", text)
    print(text)
    return 0
