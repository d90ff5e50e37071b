"""What a measurement ran on: GPU, driver and PCIe link from NVML, CPU, RAM, git commit, command line.

NVML is read through ctypes on libnvidia-ml.so.1 (the driver's own library, present wherever an
NVIDIA driver is), so no Python package is needed and a machine without one simply reports no GPU.
VRAM numbers come from the driver, not from estimates: per process where the driver can name our
process, else the device's used memory minus what was used before we started.
"""

import ctypes
import os
import platform
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

NVML_SUCCESS = 0
NVML_VALUE_NOT_AVAILABLE = 2**64 - 1  # usedGpuMemory when the driver cannot attribute memory
_NAME_BYTES = 96


class _Memory(ctypes.Structure):
    # nvmlMemory_t
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _ProcessInfo(ctypes.Structure):
    # nvmlProcessInfo_t (v2 layout, what nvmlDeviceGetComputeRunningProcesses_v3 fills)
    _fields_ = [
        ("pid", ctypes.c_uint),
        ("usedGpuMemory", ctypes.c_ulonglong),
        ("gpuInstanceId", ctypes.c_uint),
        ("computeInstanceId", ctypes.c_uint),
    ]


class Nvml:
    """The few NVML queries we need; `Nvml.open()` is None where there is no NVIDIA driver."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.handles = []
        count = ctypes.c_uint(0)
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) == NVML_SUCCESS:
            for index in range(count.value):
                handle = ctypes.c_void_p()
                if lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) == NVML_SUCCESS:
                    self.handles.append(handle)

    @classmethod
    def open(cls) -> "Nvml | None":
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return None
        # nvmlReturn_t nvmlInit_v2(void);
        if lib.nvmlInit_v2() != NVML_SUCCESS:
            return None
        return cls(lib)

    def close(self) -> None:
        # nvmlReturn_t nvmlShutdown(void);
        self.lib.nvmlShutdown()

    def _text(self, function, *args) -> str | None:
        buffer = ctypes.create_string_buffer(_NAME_BYTES)
        if function(*args, buffer, ctypes.c_uint(_NAME_BYTES)) != NVML_SUCCESS:
            return None
        return buffer.value.decode(errors="replace")

    def _uint(self, function, handle) -> int | None:
        value = ctypes.c_uint(0)
        return value.value if function(handle, ctypes.byref(value)) == NVML_SUCCESS else None

    def driver_version(self) -> str | None:
        # nvmlReturn_t nvmlSystemGetDriverVersion(char * version, unsigned int length);
        return self._text(self.lib.nvmlSystemGetDriverVersion)

    def gpus(self) -> list[dict]:
        found = []
        for index, handle in enumerate(self.handles):
            memory = _Memory()
            # nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t * memory);
            total = (
                memory.total
                if self.lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == NVML_SUCCESS
                else None
            )
            found.append(
                {
                    "index": index,
                    # nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char * name, unsigned int length);
                    "name": self._text(self.lib.nvmlDeviceGetName, handle),
                    "memory_bytes": total,
                    # nvmlReturn_t nvmlDeviceGetCurrPcieLinkGeneration(nvmlDevice_t, unsigned int *); etc.
                    "pcie_link": {
                        "generation": self._uint(self.lib.nvmlDeviceGetCurrPcieLinkGeneration, handle),
                        "width": self._uint(self.lib.nvmlDeviceGetCurrPcieLinkWidth, handle),
                        "max_generation": self._uint(self.lib.nvmlDeviceGetMaxPcieLinkGeneration, handle),
                        "max_width": self._uint(self.lib.nvmlDeviceGetMaxPcieLinkWidth, handle),
                    },
                }
            )
        return found

    def used_bytes(self) -> int:
        """Memory in use on all GPUs, every process together."""
        used = 0
        for handle in self.handles:
            memory = _Memory()
            if self.lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) == NVML_SUCCESS:
                used += memory.used
        return used

    def process_bytes(self, pid: int) -> int | None:
        """What the driver attributes to `pid` on all GPUs; None when it cannot (containers often hide
        our pid from the driver, which sees the host's)."""
        total, seen = 0, False
        for handle in self.handles:
            count = ctypes.c_uint(256)
            infos = (_ProcessInfo * count.value)()
            # nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t device,
            #     unsigned int * infoCount, nvmlProcessInfo_t * infos);
            status = self.lib.nvmlDeviceGetComputeRunningProcesses_v3(handle, ctypes.byref(count), infos)
            if status != NVML_SUCCESS:
                continue
            for info in infos[: count.value]:
                if info.pid == pid and info.usedGpuMemory != NVML_VALUE_NOT_AVAILABLE:
                    total += info.usedGpuMemory
                    seen = True
        return total if seen else None


@dataclass
class VramProbe:
    """Driver-measured VRAM of this process: open before loading the model, read while it is loaded."""

    nvml: Nvml | None
    baseline_used_bytes: int

    @classmethod
    def start(cls) -> "VramProbe":
        nvml = Nvml.open()
        return cls(nvml, nvml.used_bytes() if nvml else 0)

    def read(self) -> tuple[int | None, str]:
        """(bytes, how they were measured); (None, "no NVIDIA driver") on a machine without one."""
        if self.nvml is None or not self.nvml.handles:
            return None, "no NVIDIA driver"
        own = self.nvml.process_bytes(os.getpid())
        if own is not None:
            return own, "nvml per-process"
        return self.nvml.used_bytes() - self.baseline_used_bytes, "nvml device used minus before-load"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(directory: Path) -> str | None:
    """The commit of the checkout the package runs from, with '+dirty' when files differ from it."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=directory,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict:
    """GPU(s), driver and PCIe link (NVML), CPU model and cores, RAM: beside every number we report."""
    import psutil

    nvml = Nvml.open()
    try:
        gpus = nvml.gpus() if nvml else []
        driver = nvml.driver_version() if nvml else None
    finally:
        if nvml:
            nvml.close()
    return {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": psutil.virtual_memory().total,
        "gpus": gpus,
        "nvidia_driver": driver,
    }


def command_line() -> str:
    """This process's `edge-preattn ...` command, quoted so that it can be pasted into a shell."""
    return "edge-preattn " + shlex.join(sys.argv[1:])
