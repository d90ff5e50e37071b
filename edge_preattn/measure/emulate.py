"""An edge GPU emulated on a data-center one: fewer SMs through CUDA MPS, a slower bus, a consumer CPU.

The users of this project own 8-16 GB cards on PCIe 4.0 and desktop CPUs; the benchmark machine is an
H100/H200 with a 50 GB/s bus, 3-4.8 TB/s of memory bandwidth and 16 host cores. A profile brings the
three things that decide a MoE offload benchmark closer to the user's machine:
- the GPU: CUDA MPS caps the SMs a client may use (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE). Measured on an
  H100 (2026-12-06, shared/tools/device/mps_probe.sh): 100/20/10/5 % gave 132/26/12/8 SMs and
  2965/1711/916/627 GB/s device-to-device copy; 8 SMs is MPS's floor, so the slowest card this reaches
  is about an RTX 4070 / 3080's memory speed (504-760 GB/s), not an 8 GB card's 272 GB/s;
- the bus: every cache upload goes through the library's modelled bus (`--bandwidth`), prefetches and
  misses alike (pinned host-to-device stays about 50 GB/s under MPS, so the cap is what binds);
- the host: stock offload computes its host-resident experts on the CPU, so every configuration gets the
  same thread count, a consumer CPU's, instead of whatever cores the benchmark host has.

Not yet faithful (measured on an H100, 2026-12-07, bench/results/widened-default/): at 8 SMs every kernel
is slow, not only memory (the widened packaged model's all-on-GPU decode step went from 0.58 to 2.76 ms, so
the "GPU" fell behind the host's 8 threads), and the thread count does not cap the server host's memory
bandwidth. A real RTX 4070 has 46 SMs and a desktop CPU far less bandwidth: both push these profiles'
numbers against the GPU cache.
"""

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EdgeProfile:
    name: str
    card_class: str  # what it stands for, and where it does not match
    mps_active_thread_pct: int
    bus_bytes_per_s: float
    cpu_threads: int


PROFILES = {
    profile.name: profile
    for profile in (
        EdgeProfile(
            name="rtx4070-pcie4",
            card_class="RTX 4070/3080-class memory speed (H100 under MPS at 8 SMs: ~630 GB/s device copy) "
            "on PCIe 4.0 x16 as seen by pinned copies (~25 GB/s), an 8-core desktop CPU; far less "
            "compute than the real card (8 of 132 H100 SMs), which lengthens attention, as on small cards",
            mps_active_thread_pct=5,
            bus_bytes_per_s=25e9,
            cpu_threads=8,
        ),
        EdgeProfile(
            name="laptop-pcie4x8",
            card_class="the same GPU share on a PCIe 4.0 x8 / laptop link (~12 GB/s) with a 6-core CPU: "
            "the bus-starved case single-expert (top1) prefetch is meant for",
            mps_active_thread_pct=5,
            bus_bytes_per_s=12e9,
            cpu_threads=6,
        ),
    )
}


def get_profile(name: str) -> EdgeProfile:
    if name not in PROFILES:
        raise UserError(f"unknown --emulate profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


@contextlib.contextmanager
def mps_daemon(profile: EdgeProfile) -> Iterator[dict[str, str]]:
    """Start an MPS control daemon for this benchmark; yields the environment its clients need.

    Every CUDA process started with that environment is an MPS client limited to the profile's share
    of the SMs. The daemon is stopped on the way out, also after an error or Ctrl-C.
    """
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise UserError(
            "--emulate needs CUDA MPS (nvidia-cuda-mps-control not found): run it on an NVIDIA machine "
            "with the driver's MPS tools"
        )
    scratch = tempfile.mkdtemp(prefix="edge-mps-")
    env = {
        "CUDA_MPS_PIPE_DIRECTORY": os.path.join(scratch, "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": os.path.join(scratch, "log"),
    }
    for folder in env.values():
        os.makedirs(folder)
    daemon_env = {**os.environ, **env}
    started = subprocess.run([control, "-d"], env=daemon_env, capture_output=True, text=True, check=False)
    if started.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise UserError(
            f"the MPS daemon did not start ({(started.stderr or started.stdout).strip() or 'no output'}): "
            "--emulate needs root (or the GPU's owner) and a GPU in the Default compute mode"
        )
    time.sleep(1.0)  # the daemon opens its pipes before the first client connects
    log.info("MPS daemon up: clients limited to %d%% of the SMs", profile.mps_active_thread_pct)
    try:
        yield {**env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(profile.mps_active_thread_pct)}
    finally:
        subprocess.run([control], input="quit\n", env=daemon_env, capture_output=True, text=True, check=False)
        time.sleep(1.0)
        shutil.rmtree(scratch, ignore_errors=True)
