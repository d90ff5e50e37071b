"""The paper's Table 5 analogue: the time to load one expert and the router's k experts (up, gate and
down slices) from disk and from RAM into device memory, from pageable and from pinned host memory,
and the host→device bandwidth of one large copy. Copies go through ggml's backend API
(`ggml_backend_tensor_set` into a tensor of a device buffer, which returns once the copy is done);
pinned memory is the backend's host buffer type. "Disk" reads first drop the file's pages with
posix_fadvise(DONTNEED): where the OS ignores that, the read speed in the report shows it.
On a CPU-only build the GPU rows are marked not available and RAM→RAM memcpy is reported instead.
(`edge-preattn profile`, Table 5 and the bus bandwidth `bench` reports beside its results; split from
profile.py, unchanged.)
"""

import ctypes
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..model import native
from ..model.layout import MoeLayout
from ..units import format_bytes

log = logging.getLogger(__name__)
GGML_TYPE_I8 = 24
GGML_DEVICE_TYPE_CPU = 0
BANDWIDTH_BYTES = 256 * 1024**2


class _InitParams(ctypes.Structure):
    # struct ggml_init_params { size_t mem_size; void * mem_buffer; bool no_alloc; };
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def bind_ggml(api: native.NativeApi) -> ctypes.CDLL:
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
        self.ggml = bind_ggml(api)
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


def stats_ms(seconds: list[float]) -> dict:
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
                        "one_expert": stats_ms(one),
                        "k_experts": stats_ms(several),
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
