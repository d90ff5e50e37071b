"""Find the built llama.cpp, load it into llama-cpp-python, and bind the patch's own C functions.

llama-cpp-python loads whatever libllama LLAMA_CPP_LIB_PATH names, once per process: so a process
runs either the patched or the stock library, and benchmarks compare the two in subprocesses.
Our raw bindings reuse llama-cpp-python's library handle; each carries its C prototype above it.
"""

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ..errors import UserError
from ..interrupts import deferred
from . import build

PATCH_VERSION = 26  # what patches/ builds; llama_edge_patch_version() answers it

# ggml_backend_dev_type
GGML_BACKEND_DEVICE_TYPE_GPU = 1

# EX_SOFTWARE (sysexits.h): llama.cpp stopped the process (a GGML_ASSERT, a CUDA error)
EXIT_LLAMA_STOPPED = 70

# typedef void (*ggml_abort_callback_t)(const char * error_message);
GGML_ABORT_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_char_p)


@GGML_ABORT_CALLBACK
def _stop_in_one_line(message: bytes) -> None:
    """ggml_abort's callback: a failed GGML_ASSERT, a CUDA error. Without it ggml prints a backtrace and
    aborts (a core dump); it still calls abort() when this returns, so the process ends here, in one
    line with a status of its own. Raw os.write and os._exit: this may run on a ggml worker thread
    while the main thread is inside llama.cpp, and no Python state is safe to unwind."""
    location, _, what = message.decode(errors="replace").strip().partition(": ")
    line = (
        f"edge-preattn: llama.cpp stopped: {what} ({os.path.basename(location)}); "
        "rerun with --verbose for llama.cpp's log\n"
    )
    os.write(2, line.encode())
    os._exit(EXIT_LLAMA_STOPPED)


def stop_in_one_line_on_abort(lib_dir: Path) -> None:
    """Route ggml_abort (GGML_ASSERT, GGML_ABORT, CUDA errors) of the library in lib_dir to
    _stop_in_one_line; a library without ggml_set_abort_callback keeps its abort."""
    ggml_base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    if hasattr(ggml_base, "ggml_set_abort_callback"):
        # ggml_abort_callback_t ggml_set_abort_callback(ggml_abort_callback_t callback);
        ggml_base.ggml_set_abort_callback.restype = ctypes.c_void_p
        ggml_base.ggml_set_abort_callback.argtypes = [GGML_ABORT_CALLBACK]
        ggml_base.ggml_set_abort_callback(_stop_in_one_line)


def find_library(preset: str | None = None, stock: bool = False) -> Path:
    """The directory holding libllama.so for this preset (EDGE_PREATTN_LIB overrides everything)."""
    explicit = os.environ.get("EDGE_PREATTN_LIB")
    if explicit:
        lib_dir = Path(explicit)
        if not (lib_dir / "libllama.so").is_file():
            raise UserError(
                f"EDGE_PREATTN_LIB={lib_dir} holds no libllama.so: point it at a build's lib folder"
            )
        return lib_dir
    if preset is None:
        preset = os.environ.get("EDGE_PREATTN_PRESET") or build.detect_preset()[0]
    lib_dir = build.build_dir(preset, stock) / "lib"
    if not (lib_dir / "libllama.so").is_file():
        flag = " --stock" if stock else ""
        raise UserError(
            f"no {'stock' if stock else 'patched'} llama.cpp build for preset {preset}: "
            f"run `edge-preattn build --preset {preset}{flag}` first"
        )
    return lib_dir


@deferred()  # Ctrl-C: after it, not inside llama_cpp's import and its library's initialization
def load_llama(lib_dir: Path | None = None, offload_short_batches: bool = False) -> ModuleType:
    """Import llama_cpp bound to our library; refuses to mix two libraries in one process.

    `offload_short_batches`, for processes that run the expert cache: a ubatch too large for the
    slots (a short prompt) takes the stock path, and with the experts in host memory stock llama.cpp
    computes it on the CPU unless it has GGML_OP_OFFLOAD_MIN_BATCH (32) tokens. Lowering that to 2
    has the GPU compute it with the kernels of stock all-on-GPU, whose tokens the cache must give.
    The backend reads it once, when it registers: it must be set before the import. Not with misses
    on the CPU: the scheduler would move the CPU side's expert matmuls (ids of -1 included) to the GPU.
    """
    if offload_short_batches:
        os.environ.setdefault("GGML_OP_OFFLOAD_MIN_BATCH", "2")
    lib_dir = Path(lib_dir or find_library()).resolve()
    current = os.environ.get("LLAMA_CPP_LIB_PATH")
    import sys

    if "llama_cpp" in sys.modules and current and Path(current).resolve() != lib_dir:
        raise UserError(
            f"this process already loaded llama.cpp from {current}; "
            f"cannot also load {lib_dir} (run it in another process)"
        )
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib_dir)
    try:
        import llama_cpp
    except (OSError, RuntimeError) as error:
        raise UserError(
            f"cannot load llama.cpp from {lib_dir} ({error}); rebuild it with `edge-preattn build`"
        ) from error
    stop_in_one_line_on_abort(lib_dir)
    return llama_cpp


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    description: str
    kind: int  # GGML_BACKEND_DEVICE_TYPE_*
    handle: int


class NativeApi:
    """Raw bindings of the patch's functions and of the few ggml calls llama-cpp-python lacks."""

    def __init__(self, llama_cpp: ModuleType) -> None:
        self.lib = llama_cpp.llama_cpp._lib
        lib_dir = Path(os.environ["LLAMA_CPP_LIB_PATH"])
        self.ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
        self.ggml_base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        self.patched = hasattr(self.lib, "llama_edge_patch_version")
        if self.patched:
            # int32_t llama_edge_patch_version(void);
            self.lib.llama_edge_patch_version.restype = ctypes.c_int32
            self.lib.llama_edge_patch_version.argtypes = []
            # const char * llama_edge_build_info(void);
            self.lib.llama_edge_build_info.restype = ctypes.c_char_p
            self.lib.llama_edge_build_info.argtypes = []
        # size_t ggml_backend_dev_count(void);
        self.ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
        # ggml_backend_dev_t ggml_backend_dev_get(size_t index);
        self.ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
        self.ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        # const char * ggml_backend_dev_name(ggml_backend_dev_t device);
        self.ggml_base.ggml_backend_dev_name.restype = ctypes.c_char_p
        self.ggml_base.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
        # const char * ggml_backend_dev_description(ggml_backend_dev_t device);
        self.ggml_base.ggml_backend_dev_description.restype = ctypes.c_char_p
        self.ggml_base.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
        # enum ggml_backend_dev_type ggml_backend_dev_type(ggml_backend_dev_t device);
        self.ggml_base.ggml_backend_dev_type.restype = ctypes.c_int
        self.ggml_base.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
        # ggml_backend_buffer_type_t ggml_backend_dev_buffer_type(ggml_backend_dev_t device);
        self.ggml_base.ggml_backend_dev_buffer_type.restype = ctypes.c_void_p
        self.ggml_base.ggml_backend_dev_buffer_type.argtypes = [ctypes.c_void_p]
        # void ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
        self.ggml_base.ggml_backend_dev_memory.restype = None
        self.ggml_base.ggml_backend_dev_memory.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
            ctypes.POINTER(ctypes.c_size_t),
        ]

    def patch_version(self) -> int:
        """0 for a stock library."""
        return int(self.lib.llama_edge_patch_version()) if self.patched else 0

    def build_info(self) -> str:
        return self.lib.llama_edge_build_info().decode() if self.patched else "stock llama.cpp"

    def devices(self) -> list[Device]:
        found = []
        for index in range(self.ggml.ggml_backend_dev_count()):
            handle = self.ggml.ggml_backend_dev_get(index)
            found.append(
                Device(
                    index=index,
                    name=self.ggml_base.ggml_backend_dev_name(handle).decode(),
                    description=self.ggml_base.ggml_backend_dev_description(handle).decode(),
                    kind=self.ggml_base.ggml_backend_dev_type(handle),
                    handle=handle,
                )
            )
        return found

    def gpus(self) -> list[Device]:
        return [device for device in self.devices() if device.kind == GGML_BACKEND_DEVICE_TYPE_GPU]

    def buffer_type(self, device_name: str) -> int:
        """The ggml buffer type a `-ot PATTERN=NAME` override names (CPU, CUDA0, ...)."""
        for device in self.devices():
            if device.name.lower() == device_name.lower():
                return self.ggml_base.ggml_backend_dev_buffer_type(device.handle)
        names = ", ".join(device.name for device in self.devices())
        raise UserError(f"no device named {device_name!r} for a tensor override; this build has: {names}")

    def device_memory(self, device: Device) -> tuple[int, int]:
        """(free bytes, total bytes) as the backend reports them."""
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.ggml_base.ggml_backend_dev_memory(device.handle, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value
