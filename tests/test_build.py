"""The build pipeline: presets, patch series, cache, and that the patched library is what loads."""

import json
import os
import shutil
import subprocess

import pytest

from edge_preattn import cli
from edge_preattn.errors import UserError
from edge_preattn.model import build, native
from edge_preattn.model.native import NativeApi


def test_patched_library_is_loaded(llama_lib):
    api = NativeApi(llama_lib)
    assert api.patch_version() == native.PATCH_VERSION
    assert api.build_info().startswith(f"edge-preattn patch {native.PATCH_VERSION}; backends:")
    assert "CPU" in [device.name for device in api.devices()]


@pytest.mark.skipif(bool(os.environ.get("EDGE_PREATTN_LIB")), reason="tests run on an explicit library")
def test_second_build_call_uses_the_cache(lib_dir):
    first = build.build_library("cpu")
    second = build.build_library("cpu")
    assert first == second  # same built_at: nothing was rebuilt
    assert str(lib_dir) == first.lib_dir


def test_patch_that_does_not_apply_names_file_and_hunk(tmp_path, monkeypatch):
    tree = tmp_path / "llama.cpp"
    (tree / "src").mkdir(parents=True)
    (tree / "src" / "a.c").write_text("int a = 1;\nint b = 2;\n")
    bad = tmp_path / "0099-bad.patch"
    bad.write_text("--- a/src/a.c\n+++ b/src/a.c\n@@ -1,2 +1,2 @@\n int a = 1;\n-int b = 3;\n+int b = 4;\n")
    monkeypatch.setattr(build, "patch_files", lambda: [bad])
    with pytest.raises(UserError, match=r"0099-bad\.patch does not apply.*src/a\.c:1"):
        build.apply_patches(tree)
    assert (tree / "src" / "a.c").read_text() == "int a = 1;\nint b = 2;\n"  # untouched


def test_a_submodule_tree_is_patched_without_its_git_file(tmp_path, monkeypatch):
    """The sdist's vendor/llama.cpp carries a submodule's `.git` file naming a repository that is not
    there; `git apply` followed it and refused every patch."""
    tree = tmp_path / "vendor" / "llama.cpp"
    shutil.copytree(build.pristine_source(), tree, ignore=shutil.ignore_patterns(".complete"))
    (tree / ".git").write_text("gitdir: ../../.git/modules/vendor/llama.cpp\n")
    monkeypatch.setenv("EDGE_PREATTN_LLAMA_SOURCE", str(tree))
    patched = build.prepare_source(tmp_path / "work", stock=False)
    assert "llama_edge_patch_version" in (patched / "src" / "llama-edge.cpp").read_text()
    assert not (patched / ".git").exists()


def test_patch_hash_follows_patch_content(tmp_path, monkeypatch):
    patch = tmp_path / "0001-x.patch"
    patch.write_text("one")
    monkeypatch.setattr(build, "patch_files", lambda: [patch])
    first, stock = build.patch_hash(), build.patch_hash(stock=True)
    patch.write_text("two")
    assert build.patch_hash() != first
    assert build.patch_hash(stock=True) == stock  # stock builds ignore the patches
    assert "-stock-" in build.build_key("cpu", stock=True)


def test_presets_match_the_supported_gpus():
    presets = json.loads((build.project_root() / "CMakePresets.json").read_text())["configurePresets"]
    by_name = {preset["name"]: preset for preset in presets}
    visible = [preset["name"] for preset in presets if not preset.get("hidden")]
    assert sorted(visible) == sorted(build.PRESETS)

    def resolved(name: str) -> dict:
        variables: dict = {}
        for parent in by_name[name].get("inherits", []):
            variables.update(resolved(parent))
        variables.update(by_name[name].get("cacheVariables", {}))
        return variables

    expected_archs = {
        "cuda-v100": "70",
        "cuda-a100": "80",
        "cuda-consumer": "75;86;89;120",
        "cuda-hopper": "90",
    }
    for name in build.PRESETS:
        variables = resolved(name)
        assert variables["GGML_NATIVE"] == "OFF"  # native detection would enable AMX (SIGILL in these VMs)
        assert variables["BUILD_SHARED_LIBS"] == "ON"
        assert variables.get("CMAKE_CUDA_ARCHITECTURES") == expected_archs.get(name)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for verb in cli.VERBS:
        assert verb in out


def _nvcc_major() -> int | None:
    if shutil.which("nvcc") is None:
        return None
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=False).stdout
    marker = out.rfind("release ")
    return int(out[marker + 8 :].split(".")[0]) if marker >= 0 else None


@pytest.mark.skipif((_nvcc_major() or 0) < 13, reason="needs nvcc from CUDA 13 or newer")
def test_v100_preset_stops_under_cuda13(capsys):
    with pytest.raises(UserError, match="configure cuda-v100 failed"):
        build.configure_only("cuda-v100")
    assert "CUDA 12.x toolkit" in capsys.readouterr().err
