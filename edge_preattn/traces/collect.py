"""`edge-preattn collect`: record what a MoE GGUF really does, token by token, through the hooks.

Per token and MoE layer: the pre-attention norm output (`x_pre`, what our predictors read), the
router's input (`x_router`; the previous layer's is what a cross-layer predictor such as FATE
reads), the router probabilities and the selected ids. Prompts are grouped into shards; a shard is
written to a temporary folder and renamed when complete, and the manifest lists only complete
shards, so Ctrl-C or a crash loses at most one shard and the same command resumes.
"""

import argparse
import hashlib
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import regular_input, what_is, write_errors_as_user_errors, write_json_atomic
from ..model import native
from ..model.engine import Engine, EngineConfig, Sampling
from ..model.layout import MoeLayout, read_layout
from .hooks import Hooks, Routing

log = logging.getLogger(__name__)

FORMAT = "edge-preattn-traces/1"
SHARD_NAME = re.compile(r"^shard-\d{5}$")
PHASE_PREFILL, PHASE_DECODE = 0, 1
ACTIVATION_DTYPE, PROBS_DTYPE, IDS_DTYPE = np.float16, np.float16, np.int16

RESUMABLE = True  # Ctrl-C keeps finished shards; the same command goes on from there
HELP = "record pre-attention activations and router decisions of a MoE GGUF on a prompt set (training data)"
EXAMPLES = """\
  edge-preattn collect model.gguf --prompts prompts.txt -o traces/model
  edge-preattn collect model.gguf --prompts prompts.jsonl -n 128 --max-samples 100000 -o traces/m
  edge-preattn collect model.gguf --prompts prompts.txt --greedy --layers 0,4-7 -o traces/m
"""


@dataclass(frozen=True)
class CollectSettings:
    """Everything that decides the recorded data: resuming requires the same settings."""

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    greedy: bool = False
    layers: tuple[int, ...] | None = None  # MoE layers to record (None: all)
    n_ctx: int = 1024
    prompts_per_shard: int = 16


def read_prompts(path: Path) -> list[str]:
    """One prompt per line, or JSONL with a `text` field (a file whose first line starts with `{`).

    Refused with one line, naming the line: a file that is not UTF-8 text (random bytes once became
    thousands of prompts), a `text` that is not a string (None became the prompt "None"), and an
    empty prompt (llama.cpp aborts on a batch without tokens)."""
    data = regular_input(path, "prompts file").read_bytes()
    if b"\0" in data:
        raise UserError(f"prompts file {path} is not text (it holds NUL bytes): give one prompt per line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(
            f"{path}:{line} is not UTF-8 (byte {error.start}): save the prompts as UTF-8"
        ) from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"prompts file {path} is empty: give one prompt per line")
    if not lines[0][1].lstrip().startswith("{"):
        return [line.replace("\\n", "\n") for _, line in lines]
    prompts = []
    for number, line in lines:
        try:
            prompt = json.loads(line)["text"]
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path}:{number} is not a JSON object with a 'text' field ({error})") from None
        if not isinstance(prompt, str):
            raise UserError(f"{path}:{number}: 'text' is {type(prompt).__name__}, not a string")
        if not prompt.strip():
            raise UserError(f"{path}:{number}: 'text' is empty: give every prompt some text")
        prompts.append(prompt)
    return prompts


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """`0,3,5-7` → (0, 3, 5, 6, 7)."""
    if not text:
        return None
    layers: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            span = range(int(low), int(high or low) + 1)
            if not span:  # 5-1: an empty range once recorded no layer at all
                raise ValueError(part)
            layers.update(span)
    except ValueError:
        raise UserError(
            f"cannot read --layers {text!r}: write layer numbers and ranges such as 0,3,5-7"
        ) from None
    return tuple(sorted(layers))


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _PromptRecord:
    """Everything captured while evaluating one prompt, as lists of per-ubatch arrays."""

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = layers
        self.x_pre: dict[int, list[np.ndarray]] = {il: [] for il in layers}
        self.x_router: dict[int, list[np.ndarray]] = {il: [] for il in layers}
        self.probs: dict[int, list[np.ndarray]] = {il: [] for il in layers}
        self.selection: dict[int, list[np.ndarray]] = {il: [] for il in layers}
        self.ids: dict[int, list[np.ndarray]] = {il: [] for il in layers}

    def on_pre_attn(self, il: int, x: np.ndarray) -> None:
        if il in self.x_pre:
            self.x_pre[il].append(x.astype(ACTIVATION_DTYPE))

    def on_routing(self, routing: Routing) -> None:
        il = routing.layer
        if il not in self.ids:
            return
        self.ids[il].append(routing.ids.astype(IDS_DTYPE))
        self.probs[il].append(routing.probs.astype(PROBS_DTYPE))
        if routing.router_input is not None:
            self.x_router[il].append(routing.router_input.astype(ACTIVATION_DTYPE))
        if routing.selection is not None:
            self.selection[il].append(routing.selection.astype(np.float32))


class Collector:
    """Runs prompts through the engine with hooks on and writes shards."""

    def __init__(
        self, model: Path, layout: MoeLayout, settings: CollectSettings, n_threads: int | None = None
    ):
        self.layout = layout
        self.settings = settings
        moe = tuple(layer.index for layer in layout.moe_layers)
        wanted = settings.layers if settings.layers is not None else moe
        unknown = sorted(set(wanted) - set(moe))
        if unknown:
            raise UserError(
                f"--layers {unknown} are not MoE layers of {model.name}; its MoE layers are "
                f"{moe[0]}-{moe[-1]}"
            )
        self.layers = tuple(wanted)
        llama_cpp = native.load_llama()
        self.engine = Engine(
            llama_cpp,
            EngineConfig(str(model), n_ctx=settings.n_ctx, n_threads=n_threads, use_extra_bufts=False),
        )
        self._embedding = None

    def close(self) -> None:
        self.engine.close()

    def run_prompt(self, index: int, prompt: str) -> dict[str, np.ndarray]:
        """Prefill (every token's output) then sample; returns the prompt's arrays, row per token."""
        engine, settings = self.engine, self.settings
        tokens = engine.tokenize(prompt)[: max(1, settings.n_ctx - settings.max_new_tokens)]
        record = _PromptRecord(self.layers)
        engine.reset()
        evaluated = list(tokens)
        with Hooks(engine.api, engine.ctx, record.on_pre_attn, record.on_routing) as hooks:
            engine.decode(tokens, all_logits=True)
            sampler = engine.make_sampler(
                Sampling(
                    temperature=0.0 if settings.greedy else settings.temperature,
                    top_p=settings.top_p,
                    seed=settings.seed + index,
                )
            )
            try:
                for _ in range(settings.max_new_tokens):
                    if hooks.interrupted:
                        raise KeyboardInterrupt
                    token = engine.llama_cpp.llama_sampler_sample(sampler, engine.ctx, -1)
                    if engine.llama_cpp.llama_vocab_is_eog(engine.vocab, token):
                        break
                    engine.decode([token], all_logits=True)
                    evaluated.append(token)
            finally:
                engine.llama_cpp.llama_sampler_free(sampler)
            if hooks.interrupted:
                raise KeyboardInterrupt
            if hooks.failed:
                raise RuntimeError(f"a collection hook failed: {hooks.failed}")
        n = len(evaluated)
        arrays = {
            "tokens": np.asarray(evaluated, np.int32),
            "positions": np.arange(n, dtype=np.int32),
            "prompt": np.full(n, index, np.int32),
            "phase": np.where(np.arange(n) < len(tokens), PHASE_PREFILL, PHASE_DECODE).astype(np.int8),
        }
        first_moe = self.layout.moe_layers[0].index
        for il in self.layers:
            fields = {
                "x_pre": record.x_pre[il],
                "x_router": record.x_router[il],
                "probs": record.probs[il],
                "ids": record.ids[il],
                "selection": record.selection[il],
            }
            for name, parts in fields.items():
                if name == "selection" and not parts:
                    continue
                array = np.concatenate(parts) if parts else np.zeros((0,))
                if len(array) != n:
                    raise RuntimeError(f"layer {il} {name}: captured {len(array)} rows for {n} tokens")
                arrays[f"L{il:03d}.{name}"] = array
            # x_prev: the previous layer's router input, stored only where it cannot be looked up
            if il == first_moe:
                arrays[f"L{il:03d}.x_prev"] = self.token_embeddings(arrays["tokens"])
            elif il - 1 not in self.layers:
                raise UserError(f"--layers must include layer {il - 1} to give layer {il} its x_prev")
        return arrays

    def token_embeddings(self, tokens: np.ndarray) -> np.ndarray:
        """What the first MoE layer's 'previous layer' offers: the token embedding rows, [n, n_embd]."""
        import gguf

        if self._embedding is None:
            reader = gguf.GGUFReader(self.layout.path)
            tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
            self._embedding = (np.asarray(tensor.data), tensor.tensor_type)
        data, qtype = self._embedding
        rows = gguf.dequantize(data[tokens], qtype)  # data: [n_vocab, bytes per row] (quantized) or floats
        return rows.reshape(len(tokens), self.layout.n_embd).astype(ACTIVATION_DTYPE)


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def _write_shard(out_dir: Path, number: int, prompt_arrays: list[dict[str, np.ndarray]]) -> dict:
    final = out_dir / _shard_name(number)
    staging = out_dir / f".{final.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    files = {}
    try:
        with write_errors_as_user_errors(final):  # a full disk, a read-only folder: one line
            staging.mkdir()
            for key in prompt_arrays[0]:
                array = np.concatenate([arrays[key] for arrays in prompt_arrays])
                np.save(staging / f"{key}.npy", array)
                files[key] = {"dtype": str(array.dtype), "shape": list(array.shape)}
            shutil.rmtree(final, ignore_errors=True)
            staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # Ctrl-C or a full disk: no half shard stays
    phase = np.concatenate([arrays["phase"] for arrays in prompt_arrays])
    return {
        "name": final.name,
        "files": files,
        "tokens": len(phase),
        "prefill_tokens": int((phase == PHASE_PREFILL).sum()),
        "decode_tokens": int((phase == PHASE_DECODE).sum()),
    }


def damaged_shard(out_dir: Path, shard: object) -> str | None:
    """Why a shard the manifest lists cannot be read back (a file missing, cut short by a crash or of
    another shape than recorded), or None. Reads only the .npy headers."""
    name = shard.get("name") if isinstance(shard, dict) else None
    files = shard.get("files") if isinstance(shard, dict) else None
    if not isinstance(name, str) or not SHARD_NAME.match(name) or not isinstance(files, dict) or not files:
        return "its entry in manifest.json is damaged"
    for key, info in files.items():
        if Path(key).name != key or key.startswith("."):
            return f"its entry names a file outside the shard ({key!r})"
        path = out_dir / name / f"{key}.npy"
        if path.exists() and not path.is_file():  # a FIFO: np.load would wait forever
            return f"{path.name} is not a regular file"
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            return f"{path.name}: {error}"
        recorded = (info.get("shape"), info.get("dtype")) if isinstance(info, dict) else None
        if recorded != (list(array.shape), str(array.dtype)):
            return f"{path.name} holds {array.dtype} {list(array.shape)}, not what the manifest recorded"
    return None


def bytes_per_token(layout: MoeLayout, n_layers: int) -> int:
    """Disk per recorded token: two float16 activations, float16 probs, int16 ids per layer."""
    return n_layers * (2 * layout.n_embd * 2 + layout.n_expert * 2 + layout.n_expert_used * 2) + 16


def open_manifest(out_dir: Path, expected: dict) -> dict:
    """The existing manifest when it matches (resume), or a fresh one; refuses another model's folder."""
    path = out_dir / "manifest.json"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"-o {out_dir} is {what_is(out_dir)}: give a folder for the traces")
    if not path.is_file():
        if out_dir.exists() and any(p for p in out_dir.iterdir() if not p.name.startswith(".")):
            raise UserError(f"{out_dir} is not empty and has no manifest.json: choose a new -o folder")
        return {**expected, "shards": []}
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"{path} is damaged (not a manifest written by collect): choose a new -o folder")
    if manifest.get("fingerprint") != expected["fingerprint"]:
        raise UserError(
            f"{out_dir} holds traces of another model (fingerprint {str(manifest.get('fingerprint'))[:16]}"
            f" ≠ {expected['fingerprint'][:16]}): choose a new -o folder"
        )
    for key in ("prompts_sha256", "settings"):
        if manifest.get(key) != expected[key]:
            raise UserError(
                f"{out_dir} was collected with other {key.replace('_', ' ')}: rerun with the same "
                "prompts and flags to resume, or choose a new -o folder"
            )
    return manifest


def collect(
    model: Path,
    prompts_file: Path,
    out_dir: Path,
    settings: CollectSettings,
    *,
    max_samples: int | None = None,
    n_threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Collect (or resume) a trace set; returns the manifest."""
    from tqdm import tqdm

    layout = read_layout(model)
    prompts = read_prompts(prompts_file)
    expected = {
        "format": FORMAT,
        "model": str(model),
        "fingerprint": layout.fingerprint,
        "layout": {
            "arch": layout.arch,
            "n_layer": layout.n_layer,
            "n_embd": layout.n_embd,
            "n_expert": layout.n_expert,
            "n_expert_used": layout.n_expert_used,
            "gating": layout.gating,
            "moe_layers": [layer.index for layer in layout.moe_layers],
        },
        "prompts_file": str(prompts_file),
        "prompts_sha256": _sha256_file(prompts_file),
        "settings": {**settings.__dict__, "layers": list(settings.layers) if settings.layers else None},
        "dtypes": {
            "x_pre": "float16",
            "x_router": "float16",
            "x_prev": "float16",
            "probs": "float16",
            "ids": "int16",
            "selection": "float32",
            "tokens": "int32",
            "phase": "int8 (0 prefill, 1 decode)",
        },
    }
    manifest = open_manifest(out_dir, expected)
    kept = []
    for shard in manifest["shards"]:
        why = damaged_shard(out_dir, shard)
        if why is None:
            kept.append(shard)
        else:
            log.warning("%s/%s is damaged (%s): collecting it again", out_dir, shard.get("name"), why)
    manifest["shards"] = kept
    collector = Collector(model, layout, settings, n_threads)
    n_layers = len(collector.layers)
    estimate = len(prompts) * (30 + settings.max_new_tokens) * bytes_per_token(layout, n_layers)
    if max_samples:
        estimate = min(estimate, max_samples * bytes_per_token(layout, n_layers))
    existing = next(parent for parent in (out_dir, *out_dir.parents) if parent.is_dir())
    free = shutil.disk_usage(existing).free
    log.info(
        "collecting %d prompts × (prefill + ≤%d new tokens), %d MoE layers; "
        "disk needed ≈ %.0f MiB (free %.1f GiB)",
        len(prompts),
        settings.max_new_tokens,
        n_layers,
        estimate / 2**20,
        free / 2**30,
    )
    if estimate > free:
        collector.close()
        raise UserError(
            f"about {estimate / 2**30:.1f} GiB needed but {free / 2**30:.1f} GiB free in {existing}: "
            "free some space, or pass --max-samples"
        )
    with write_errors_as_user_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    done_tokens = sum(shard["tokens"] for shard in manifest["shards"])
    per_shard = settings.prompts_per_shard
    started = time.monotonic()
    try:
        with tqdm(
            total=len(prompts),
            initial=len(manifest["shards"]) * per_shard,
            unit="prompt",
            disable=not progress,
        ) as bar:
            done = {shard["name"] for shard in manifest["shards"]}  # a shard dropped from it is redone
            for number in range((len(prompts) + per_shard - 1) // per_shard):
                if _shard_name(number) in done:
                    continue
                if max_samples and done_tokens >= max_samples:
                    break
                first = number * per_shard
                group = [
                    collector.run_prompt(i, prompts[i])
                    for i in range(first, min(first + per_shard, len(prompts)))
                ]
                shard = _write_shard(out_dir, number, group)
                shard["prompts"] = [first, first + len(group)]
                manifest["shards"] = sorted([*manifest["shards"], shard], key=lambda s: s["name"])
                manifest["totals"] = {
                    key: sum(s[key] for s in manifest["shards"])
                    for key in ("tokens", "prefill_tokens", "decode_tokens")
                }
                write_json_atomic(out_dir / "manifest.json", manifest)
                done_tokens += shard["tokens"]
                bar.update(len(group))
                bar.set_postfix(
                    samples=done_tokens, per_s=f"{done_tokens / (time.monotonic() - started):.0f}"
                )
    finally:
        collector.close()
    return manifest


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="MoE GGUF file")
    parser.add_argument(
        "--prompts", required=True, help="prompts: one per line, or JSONL with a 'text' field"
    )
    parser.add_argument("-o", "--output", required=True, help="output folder (resumes if it holds this run)")
    parser.add_argument(
        "-n", "--max-new-tokens", type=int, default=64, help="generated tokens per prompt (default 64)"
    )
    parser.add_argument("--max-samples", type=int, help="stop after about this many tokens")
    parser.add_argument("--temp", type=float, default=0.8, help="sampling temperature (default 0.8)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="prompt i samples with seed + i")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (small models degenerate)")
    parser.add_argument("--layers", help="MoE layers to record, e.g. 0,3,5-7 (default all)")
    parser.add_argument("-c", "--ctx-size", type=int, default=1024, help="context size (default 1024)")
    parser.add_argument("-t", "--threads", type=int)
    parser.add_argument("--prompts-per-shard", type=int, default=16)


def main(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise UserError("--max-new-tokens must be 0 or more")
    if args.ctx_size <= args.max_new_tokens:
        raise UserError(
            f"-c {args.ctx_size} leaves no room for a prompt and -n {args.max_new_tokens}: raise -c, lower -n"
        )
    if args.prompts_per_shard < 1 or (args.max_samples is not None and args.max_samples < 1):
        raise UserError("--prompts-per-shard and --max-samples must be at least 1")
    if args.temp < 0 or not 0 < args.top_p <= 1:
        raise UserError("--temp must be 0 or more and --top-p lie in (0, 1]")
    settings = CollectSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temp,
        top_p=args.top_p,
        seed=args.seed,
        greedy=args.greedy,
        layers=parse_layers(args.layers),
        n_ctx=args.ctx_size,
        prompts_per_shard=args.prompts_per_shard,
    )
    started = time.monotonic()
    manifest = collect(
        Path(args.model),
        Path(args.prompts),
        Path(args.output),
        settings,
        max_samples=args.max_samples,
        n_threads=args.threads,
    )
    seconds = time.monotonic() - started
    totals = manifest.get("totals", {})
    disk = sum(f.stat().st_size for f in Path(args.output).rglob("*.npy"))
    print(
        f"{totals.get('tokens', 0)} tokens ({totals.get('prefill_tokens', 0)} prefill, "
        f"{totals.get('decode_tokens', 0)} decode) in {len(manifest['shards'])} shards, "
        f"{disk / 2**20:.1f} MiB; this call took {seconds:.1f}s"
    )
    return 0
