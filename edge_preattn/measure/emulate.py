"""An edge GPU emulated on a data-center one: its SMs, its memory bandwidth, its bus and its host CPU.

The users of this project own 8-16 GB cards on PCIe 4.0 and desktop CPUs; the benchmark machine is an
H100/H200 with a 50 GB/s bus, 3-4.8 TB/s of memory bandwidth and 16 host cores. A profile names a card
class by four numbers and brings the benchmark's processes to them:
- SMs: CUDA MPS caps the SMs a client may use (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), set from the card's SM
  count and the device's. MPS alone is not enough: on an H100 (2026-12-06, shared/tools/device/
  mps_probe.sh) 100/20/10/5 % gave 132/26/12/8 SMs and still 2965/1711/916/627 GB/s of device copy, so
  a client with a consumer card's SMs keeps most of an H100's memory and, at the SM floor, every kernel
  slows instead (the widened packaged model's all-on-GPU step went from 0.58 to 2.76 ms at 8 SMs,
  bench/results/widened-default/);
- memory bandwidth: so a second MPS client, `emulate_load.cu` on the remaining SMs, keeps the memory
  busy for a duty cycle calibrated at start until the benchmark's own device copy measures the card's
  bandwidth (or as close as the load gets; the measured values go into the bench JSON);
- the bus: every cache upload goes through the library's modelled bus (`--bandwidth`), prefetches and
  misses alike (pinned host-to-device stays about 50 GB/s under MPS, so the cap is what binds);
- the host: stock offload computes its host-resident experts on the CPU, so every configuration gets the
  same thread count, a consumer CPU's. The server host's memory bandwidth is not capped: stock's
  CPU-expert configurations stay faster than on a desktop, which favours stock.
"""

import contextlib
import hashlib
import logging
import math
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..files import atomic_output, output_folder
from ..model.build import cache_dir

log = logging.getLogger(__name__)

LOAD_SOURCE = Path(__file__).with_name("emulate_load.cu")
PROBE_TIMEOUT_S = 60
DUTY_STEPS = 5  # bisection steps of the load's duty cycle: within 1/32 of the best duty
MPS_SETTLE_S = 1.0  # the daemon opens its pipes before the first client connects


@dataclass(frozen=True)
class EdgeProfile:
    name: str
    card_class: str  # what it stands for, and where it does not match
    sm_count: int  # the card's SMs; the MPS share is this over the device's
    memory_bytes_per_s: float  # the card's memory bandwidth, what the load calibrates the device copy to
    bus_bytes_per_s: float
    cpu_threads: int


PROFILES = {
    profile.name: profile
    for profile in (
        EdgeProfile(
            name="rtx4070-pcie4",
            card_class="RTX 4070 12 GB (46 SMs, 504 GB/s) on PCIe 4.0 x16 as seen by pinned copies "
            "(~25 GB/s), an 8-core desktop CPU",
            sm_count=46,
            memory_bytes_per_s=504e9,
            bus_bytes_per_s=25e9,
            cpu_threads=8,
        ),
        EdgeProfile(
            name="laptop-pcie4x8",
            card_class="RTX 4060 Laptop 8 GB (24 SMs, 256 GB/s) on a PCIe 4.0 x8 link (~12 GB/s), a "
            "6-core laptop CPU: the bus-starved case single-expert (top1) prefetch is meant for",
            sm_count=24,
            memory_bytes_per_s=256e9,
            bus_bytes_per_s=12e9,
            cpu_threads=6,
        ),
    )
}


@dataclass
class Emulation:
    """What a benchmark's CUDA processes need (`env`) and what the calibration measured (`measured`)."""

    env: dict[str, str]
    measured: dict[str, float | int] = field(default_factory=dict)


def get_profile(name: str) -> EdgeProfile:
    if name not in PROFILES:
        raise UserError(f"unknown --emulate profile {name!r}; choose one of {', '.join(PROFILES)}")
    return PROFILES[name]


def _said(done: subprocess.CompletedProcess) -> str:
    """What a finished tool printed, for a one-line message: its errors, else its output."""
    return (done.stderr or done.stdout).strip() or "no output"


def _load_program() -> Path:
    """emulate_load.cu compiled once per source text into the cache (nvcc, as the CUDA build uses)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise UserError("--emulate needs nvcc (the CUDA toolkit that builds the CUDA library) on PATH")
    digest = hashlib.sha256(LOAD_SOURCE.read_bytes()).hexdigest()[:12]
    program = output_folder(cache_dir() / "tools") / f"emulate_load-{digest}"
    if not program.is_file():
        with atomic_output(program) as temporary:
            built = subprocess.run(
                [nvcc, "-std=c++17", "-O2", "-o", str(temporary), str(LOAD_SOURCE)],
                capture_output=True,
                text=True,
                check=False,
            )
            if built.returncode != 0:
                raise UserError(f"nvcc could not build {LOAD_SOURCE.name}: {_said(built).splitlines()[-1]}")
    return program


def _probe(program: Path, env: dict[str, str]) -> tuple[int, float]:
    """(SMs, device-copy GB/s) as one MPS client with `env` sees them."""
    try:
        done = subprocess.run(
            [str(program), "probe"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise UserError(f"the --emulate probe did not answer in {PROBE_TIMEOUT_S} s (is MPS up?)") from None
    found = re.search(r"sms=(\d+) device_copy_GBps=([\d.]+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise UserError(f"the --emulate probe failed: {_said(done)}")
    return int(found.group(1)), float(found.group(2))


@contextlib.contextmanager
def _load(program: Path, env: dict[str, str], duty: float) -> Iterator[None]:
    """The memory load running at `duty` as its own MPS client, stopped on the way out."""
    process = subprocess.Popen(
        [str(program), "load", f"{duty:.4f}"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        started = select.select([process.stdout], [], [], PROBE_TIMEOUT_S)[0]  # a hung MPS client too
        if not started or process.stdout.readline().strip() != "ready":
            process.kill()
            why = process.communicate()[1].strip() or f"no answer in {PROBE_TIMEOUT_S} s"
            raise UserError(f"the --emulate memory load did not start: {why}")
        yield
    finally:
        process.kill()
        process.wait()


def _calibrated_duty(
    program: Path, client: dict[str, str], load: dict[str, str], alone_gbps: float, target_gbps: float
) -> tuple[float, float]:
    """Bisect the load's duty cycle until the client's device copy is nearest the target rate.

    Returns (duty, GB/s the client measured with it): duty 0 when the client is at or below the target
    alone, 1 when even a full load leaves it above.
    """
    if alone_gbps <= target_gbps:
        return 0.0, alone_gbps
    with _load(program, load, 1.0):
        best = (1.0, _probe(program, client)[1])
    if best[1] >= target_gbps:
        return best
    low, high = 0.0, 1.0
    for _ in range(DUTY_STEPS):
        duty = (low + high) / 2
        with _load(program, load, duty):
            measured = _probe(program, client)[1]
        if abs(measured - target_gbps) < abs(best[1] - target_gbps):
            best = (duty, measured)
        low, high = (duty, high) if measured > target_gbps else (low, duty)
    return best


@contextlib.contextmanager
def edge_gpu(profile: EdgeProfile) -> Iterator[Emulation]:
    """Start MPS and the calibrated memory load; yield the benchmark clients' environment and the
    calibration. Everything is stopped on the way out, also after an error or Ctrl-C."""
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise UserError(
            "--emulate needs CUDA MPS (nvidia-cuda-mps-control not found): run it on an NVIDIA machine "
            "with the driver's MPS tools"
        )
    program = _load_program()
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
            f"the MPS daemon did not start ({_said(started)}): "
            "--emulate needs root (or the GPU's owner) and a GPU in the Default compute mode"
        )
    time.sleep(MPS_SETTLE_S)
    try:
        device_sms, device_gbps = _probe(program, env)
        share_pct = min(100, math.ceil(100 * profile.sm_count / device_sms))
        client = {**env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(share_pct)}
        load = {**env, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(max(1, 100 - share_pct))}
        client_sms, alone_gbps = _probe(program, client)
        duty, client_gbps = _calibrated_duty(
            program, client, load, alone_gbps, profile.memory_bytes_per_s / 1e9
        )
        measured = {
            "device_sms": device_sms,
            "device_copy_gbps": device_gbps,
            "mps_active_thread_pct": share_pct,
            "client_sms": client_sms,
            "client_copy_gbps_alone": alone_gbps,
            "load_duty": duty,
            "client_copy_gbps": client_gbps,
        }
        log.info(
            "emulating %s: %d of %d SMs, device copy %.0f GB/s (alone %.0f, target %.0f), load duty %.2f",
            profile.name, client_sms, device_sms, client_gbps, alone_gbps, profile.memory_bytes_per_s / 1e9,
            duty,
        )  # fmt: skip
        with contextlib.ExitStack() as running:
            if duty > 0:
                running.enter_context(_load(program, load, duty))
            yield Emulation(env=client, measured=measured)
    finally:
        subprocess.run([control], input="quit\n", env=daemon_env, capture_output=True, text=True, check=False)
        time.sleep(MPS_SETTLE_S)
        shutil.rmtree(scratch, ignore_errors=True)
