"""Shared fixtures: the patched CPU library (built once, cached outside the repo) and ../shared files."""

import logging
import os
from pathlib import Path

import pytest

from edge_preattn.model import build, native

REPO = Path(__file__).resolve().parents[1]
SHARED_CANDIDATES = tuple(
    Path(p) for p in (os.environ.get("EDGE_PREATTN_SHARED"), REPO.parent / "shared", "/work/shared") if p
)


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` need a CUDA build and a GPU: they run only where EDGE_PREATTN_GPU_TESTS=1."""
    if os.environ.get("EDGE_PREATTN_GPU_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA build and a GPU (EDGE_PREATTN_GPU_TESTS=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_file(relative: str) -> Path | None:
    """A fixture from ../shared, or None: tests skip, never fail, when it is absent."""
    for root in SHARED_CANDIDATES:
        if (root / relative).is_file():
            return root / relative
    return None


@pytest.fixture(scope="session")
def lib_dir() -> Path:
    """The patched library of the test preset (cpu unless EDGE_PREATTN_TEST_PRESET says otherwise)."""
    if os.environ.get("EDGE_PREATTN_LIB"):
        return native.find_library()
    preset = os.environ.get("EDGE_PREATTN_TEST_PRESET", "cpu")
    lib = Path(build.build_library(preset).lib_dir)
    os.environ["EDGE_PREATTN_LIB"] = str(lib)  # every load in this process, library code's too
    return lib


@pytest.fixture(scope="session")
def llama_lib(lib_dir: Path):
    """llama_cpp, bound to the patched library (one library per process)."""
    return native.load_llama(lib_dir)


@pytest.fixture(scope="session")
def moe_ref_a() -> Path:
    path = shared_file("models/moe-ref-a.gguf")
    if path is None:
        pytest.skip("../shared/models/moe-ref-a.gguf is absent")
    return path


@pytest.fixture(autouse=True)
def fresh_cli_log_handlers():
    """`cli.main` binds its log handlers to the stderr of its first call in a process; under pytest that
    stream is closed with its test, so every test starts and ends without them (pytest's own stay)."""

    def drop() -> None:
        for logger in (logging.root, logging.getLogger("edge_preattn")):
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)

    drop()
    yield
    drop()
