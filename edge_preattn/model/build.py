"""Build llama.cpp, patched by `patches/` (or stock, for comparisons), and cache it outside the repo.

The source is the llama.cpp vendored in one pinned llama-cpp-python sdist, so the library we build
and the Python bindings that load it (through LLAMA_CPP_LIB_PATH) always agree on every struct.
A build is keyed by (preset, llama-cpp-python version, hash of the patches): a second call with
the same key finds it and returns at once.
"""

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# The parts of vendor/llama.cpp that building libllama needs (models/ and docs/ alone are 110 MB).
SOURCE_PARTS = ("CMakeLists.txt", "LICENSE", "cmake", "ggml", "src", "include", "vendor", "licenses")
PRESETS = ("cpu", "cuda-v100", "cuda-a100", "cuda-consumer", "cuda-hopper")
STOCK = "stock"

# compute capability (major, minor) -> preset that targets it
_PRESET_BY_CAPABILITY = {(7, 0): "cuda-v100", (8, 0): "cuda-a100", (9, 0): "cuda-hopper"}

HELP = "build the patched (or stock) llama.cpp library for a preset; cached, so a second call is instant"
EXAMPLES = """\
  edge-preattn build                      # CUDA preset for the visible GPU, else cpu
  edge-preattn build --preset cuda-hopper
  edge-preattn build --preset cpu --stock # unpatched library of the same version (benchmarks)
  edge-preattn build --preset cuda-a100 --configure-only
  edge-preattn build --list               # what is cached
"""


@dataclass(frozen=True)
class BuildInfo:
    """What `build.json` beside the libraries records, so a run can say what it loaded."""

    preset: str
    variant: str  # STOCK, or the patch hash
    llama_cpp_python: str
    lib_dir: str
    seconds: float
    built_at: str
    host: str


def project_root() -> Path:
    root = Path(__file__).resolve().parents[2]  # edge_preattn/model/build.py -> the checkout
    if not (root / "CMakePresets.json").is_file():
        raise UserError(
            f"CMakePresets.json not found beside the package ({root}): install edge-preattn from a "
            "source checkout with `pip install -e .`"
        )
    return root


def cache_dir() -> Path:
    """Builds live outside the repo so that clones, CI runs and sessions on one machine share them."""
    explicit = os.environ.get("EDGE_PREATTN_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-preattn"


def patch_files() -> list[Path]:
    return sorted((project_root() / "patches").glob("*.patch"))


def _recipe_files(stock: bool) -> list[Path]:
    """What decides a build besides the preset name: the build files, and the patches unless stock."""
    root = project_root()
    files = [root / "CMakeLists.txt", root / "CMakePresets.json", *sorted((root / "cmake").glob("*"))]
    return files if stock else [*files, *patch_files()]


def patch_hash(stock: bool = False) -> str:
    """Hash of the patch series and build files: any edit to either is a new build key."""
    digest = hashlib.sha256()
    for path in _recipe_files(stock):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def build_key(preset: str, stock: bool) -> str:
    return f"{preset}-lcp{LLAMA_CPP_PYTHON_VERSION}-{STOCK if stock else 'patched'}-{patch_hash(stock)}"


def build_dir(preset: str, stock: bool) -> Path:
    return cache_dir() / "builds" / build_key(preset, stock)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fetch_sdist(dest_dir: Path) -> Path:
    archive = dest_dir / SDIST_NAME
    if not archive.is_file():
        log.info(
            "fetching llama-cpp-python %s sdist (llama.cpp source) with pip ...", LLAMA_CPP_PYTHON_VERSION
        )
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
            "-d",
            str(dest_dir),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not archive.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"could not download the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist ({last}); "
                f"without access to the package index, fetch it on a machine that has it with `pip "
                f"download --no-deps --no-binary :all: llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}` and "
                f"copy {SDIST_NAME} into {dest_dir}, or set EDGE_PREATTN_LLAMA_SOURCE to its extracted "
                "vendor/llama.cpp"
            )
    if _sha256(archive) != SDIST_SHA256:
        raise UserError(
            f"{archive} does not have the pinned sha256 {SDIST_SHA256}: delete it and build again"
        )
    return archive


def pristine_source() -> Path:
    """The unmodified llama.cpp tree, extracted once per version from the sdist."""
    explicit = os.environ.get("EDGE_PREATTN_LLAMA_SOURCE")
    if explicit:
        tree = Path(explicit)
        if not (tree / "src" / "llama.cpp").is_file():
            raise UserError(
                f"EDGE_PREATTN_LLAMA_SOURCE={tree} is not a llama.cpp source tree (no src/llama.cpp)"
            )
        return tree
    src_root = cache_dir() / "src"
    tree = src_root / f"llama.cpp-lcp{LLAMA_CPP_PYTHON_VERSION}"
    if (tree / ".complete").is_file():
        return tree
    src_root.mkdir(parents=True, exist_ok=True)
    archive = _fetch_sdist(src_root)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    staging = Path(tempfile.mkdtemp(prefix="extract-", dir=src_root))
    try:
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                relative = member.name[len(prefix) :] if member.name.startswith(prefix) else None
                if relative and relative.split("/")[0] in SOURCE_PARTS:
                    member.name = relative
                    members.append(member)
            tar.extractall(staging, members=members, filter="data")
        (staging / ".complete").write_text(SDIST_SHA256 + "\n")
        shutil.rmtree(tree, ignore_errors=True)
        staging.rename(tree)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree


def apply_patches(tree: Path) -> None:
    """Apply patches/*.patch in order; a patch that does not apply names its file and hunk."""
    # Stop git from treating an enclosing repository (the cache may sit inside one) as the target.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    for patch in patch_files():
        check = subprocess.run(
            ["git", "apply", "--check", "-v", str(patch)],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if check.returncode != 0:
            failed = [line for line in check.stderr.splitlines() if line.startswith("error:")]
            raise UserError(
                f"{patch.name} does not apply to llama.cpp of llama-cpp-python "
                f"{LLAMA_CPP_PYTHON_VERSION}: {'; '.join(failed) or check.stderr.strip()}"
            )
        subprocess.run(["git", "apply", str(patch)], cwd=tree, env=env, check=True, capture_output=True)
        log.info("applied %s", patch.name)


def prepare_source(dest: Path, stock: bool) -> Path:
    """A copy of the pristine tree at `dest`, patched unless `stock`.

    The copy leaves out `.git`: in a tree taken from the sdist's or a checkout's `vendor/llama.cpp` it is
    a submodule's `.git` file, and `git apply` would follow it to a repository that is not there.
    """
    shutil.copytree(pristine_source(), dest, ignore=shutil.ignore_patterns(".complete", ".git"))
    if not stock:
        apply_patches(dest)
    return dest


def detect_preset() -> tuple[str, list[str]]:
    """Pick the preset for this machine; the lines say what was found, llm.c style."""
    findings = []
    nvcc = shutil.which("nvcc")
    findings.append(f"✓ nvcc: {nvcc}" if nvcc else "✗ nvcc not found")
    capability = None
    if shutil.which("nvidia-smi"):
        result = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        line = (
            result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else ""
        )
        if "," in line:
            name, cap = (part.strip() for part in line.split(",", 1))
            with contextlib.suppress(ValueError):
                capability = tuple(int(x) for x in cap.split("."))
            findings.append(f"✓ GPU: {name} (compute capability {cap})")
    if capability is None:
        findings.append("✗ no NVIDIA GPU visible (nvidia-smi)")
    preset = _PRESET_BY_CAPABILITY.get(capability, "cuda-consumer") if nvcc and capability else "cpu"
    findings.append(f"→ preset {preset}")
    return preset, findings


def _run_logged(command: list[str], cwd: Path, log_file, what: str) -> None:
    """Run a build step into the log; show Ninja's [n/N] lines as a progress bar."""
    from tqdm import tqdm

    log_file.write(f"$ {' '.join(command)}\n")
    log_file.flush()
    with (
        subprocess.Popen(
            command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        ) as proc,
        tqdm(total=None, desc=what, unit="step", disable=None) as bar,
    ):
        assert proc.stdout is not None
        reported_tenths = 0  # without a terminal (CI, a log file) the bar is off: a line per 10 % instead
        for line in proc.stdout:
            log_file.write(line)
            match = re.match(r"\[(\d+)/(\d+)\]", line)
            if match:
                bar.total = int(match.group(2))
                bar.n = int(match.group(1))
                bar.refresh()
                tenths = 10 * bar.n // bar.total
                if bar.disable and tenths > reported_tenths:
                    reported_tenths = tenths
                    log.info("%s: %d/%d steps (%d%%)", what, bar.n, bar.total, 10 * tenths)
    if proc.returncode != 0:
        log_file.flush()
        tail = Path(log_file.name).read_text(errors="replace").splitlines()[-25:]
        sys.stderr.write("\n".join(tail) + "\n")
        raise UserError(f"{what} failed (exit {proc.returncode}); the full log is {log_file.name}")


def configure_command(preset: str, binary_dir: Path, source: Path, install_dir: Path | None) -> list[str]:
    command = ["cmake", "--preset", preset, "-B", str(binary_dir), f"-DEDGE_LLAMA_SOURCE={source}"]
    if install_dir is not None:
        command.append(f"-DCMAKE_INSTALL_PREFIX={install_dir}")
    return command


def build_library(
    preset: str, stock: bool = False, jobs: int | None = None, force: bool = False
) -> BuildInfo:
    """Build (or find) the library for `preset`; returns where it is."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    for tool in ("cmake", "ninja", "git"):
        if shutil.which(tool) is None:
            raise UserError(
                f"{tool} not found on PATH: install it (e.g. `pip install cmake ninja`) and retry"
            )
    dest = build_dir(preset, stock)
    info_file = dest / "build.json"
    if info_file.is_file() and not force:
        return BuildInfo(**json.loads(info_file.read_text()))
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per key at a time; a waiter then finds it cached
        if info_file.is_file() and not force:
            return BuildInfo(**json.loads(info_file.read_text()))
        return _build_locked(preset, stock, dest, jobs)


def _build_locked(preset: str, stock: bool, dest: Path, jobs: int | None) -> BuildInfo:
    root = project_root()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.parent))
    try:
        source = prepare_source(work / "llama.cpp", stock)
        install = work / "install"
        # beside the cache entry, not in the work tree: a failed build's log outlives the cleanup below
        log_path = dest.parent / f"{dest.name}.build.log"
        with open(log_path, "w") as log_file:
            _run_logged(
                configure_command(preset, work / "build", source, install),
                root,
                log_file,
                f"configure {preset}",
            )
            build = ["cmake", "--build", str(work / "build"), "-j", str(jobs or os.cpu_count() or 2)]
            _run_logged(build, root, log_file, f"build {preset}{' (stock)' if stock else ''}")
            _run_logged(["cmake", "--install", str(work / "build")], root, log_file, "install")
        shutil.move(log_path, install / "build.log")
        _check_shared_libstdcxx(install / "lib" / "libllama.so")
        info = BuildInfo(
            preset=preset,
            variant=f"{STOCK if stock else 'patched'}-{patch_hash(stock)}",
            llama_cpp_python=LLAMA_CPP_PYTHON_VERSION,
            lib_dir=str(dest / "lib"),
            seconds=round(time.monotonic() - started, 1),
            built_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            host=platform.node(),
        )
        (install / "build.json").write_text(json.dumps(asdict(info), indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        install.rename(dest)
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _check_shared_libstdcxx(library: Path) -> None:
    """Refuse libraries that carry their own libstdc++: two copies in one process crash at model load.

    Seen with a compiler whose default links libstdc++ statically (CXX=/opt/gcc/bin/g++ on one image).
    """
    if shutil.which("ldd") is None or not library.is_file():
        return
    needed = subprocess.run(["ldd", str(library)], capture_output=True, text=True, check=False).stdout
    if "libstdc++" not in needed:
        compiler = os.environ.get("CXX", "c++")
        raise UserError(
            f"{library.name} was linked with a static libstdc++ by {compiler}: each ggml library "
            "then has its own copy and llama.cpp crashes loading a model; build with a compiler "
            "that links it dynamically, e.g. `CXX=/usr/bin/g++ CC=/usr/bin/gcc edge-preattn build`"
        )


def configure_only(preset: str) -> Path:
    """Configure a preset without compiling: checks flags and toolkits for GPUs we cannot build for here.

    Returns the configure log (kept; the configured tree is removed).
    """
    root = project_root()
    work = Path(tempfile.mkdtemp(prefix=f"configure-{preset}-"))
    log_path = work / "configure.log"
    try:
        with open(log_path, "w") as log_file:
            _run_logged(
                configure_command(preset, work / "build", pristine_source(), None),
                root,
                log_file,
                f"configure {preset}",
            )
    finally:
        shutil.rmtree(work / "build", ignore_errors=True)
    return log_path


def cached_builds() -> list[BuildInfo]:
    found = []
    for info_file in sorted((cache_dir() / "builds").glob("*/build.json")):
        with contextlib.suppress(ValueError, TypeError):
            found.append(BuildInfo(**json.loads(info_file.read_text())))
    return found


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", choices=PRESETS, help="default: detected (CUDA when nvcc and a GPU are found)"
    )
    parser.add_argument("--stock", action="store_true", help="build llama.cpp without the patches")
    parser.add_argument("-j", "--jobs", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build exists")
    parser.add_argument("--configure-only", action="store_true", help="run CMake's configure step only")
    parser.add_argument("--list", action="store_true", help="list cached builds and exit")


def main(args: argparse.Namespace) -> int:
    if args.list:
        for info in cached_builds():
            print(f"{info.preset:14} {info.variant:22} {info.seconds:8.1f}s  {info.lib_dir}")
        return 0
    preset = args.preset
    if preset is None:
        preset, findings = detect_preset()
        print("\n".join(findings))
    if args.configure_only:
        log_path = configure_only(preset)
        print(f"✓ configured {preset} (log: {log_path})")
        return 0
    was_cached = (build_dir(preset, args.stock) / "build.json").is_file() and not args.force
    info = build_library(preset, stock=args.stock, jobs=args.jobs, force=args.force)
    kind = info.variant
    status = "cached" if was_cached else f"built in {info.seconds:.0f}s"
    print(f"✓ {preset} {kind} llama.cpp: {status}: {info.lib_dir}")
    return 0
