"""Every command meets a bad model file with one line that names the problem, exit 2, nothing written."""

import pytest

from edge_preattn import cli
from edge_preattn.synth import write_synthetic


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    not_gguf = root / "notes.gguf"
    not_gguf.write_text("this is a text file, not a model\n")
    good = root / "tiny.gguf"
    write_synthetic("tiny", good, progress=False)
    truncated = root / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {
        "not a GGUF": not_gguf,
        "truncated": truncated,
        "a directory": root,
        "missing": root / "nope.gguf",
    }


@pytest.mark.parametrize("kind", ["not a GGUF", "truncated", "a directory", "missing"])
@pytest.mark.parametrize("verb", ["inspect", "run", "collect"])
def test_bad_model_is_one_line_error_for_every_command(llama_lib, bad_models, tmp_path, capsys, verb, kind):
    model = str(bad_models[kind])
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n")
    out = tmp_path / "out"
    argv = {
        "inspect": ["inspect", model],
        "run": ["run", "-m", model, "-n", "4"],
        "collect": ["collect", model, "--prompts", str(prompts), "-o", str(out)],
    }[verb]
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("edge-preattn: error:"), err
    assert not out.exists() or not any(out.iterdir())  # nothing written
