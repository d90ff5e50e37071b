"""One llama.cpp model and context, driven through llama-cpp-python's raw bindings.

We use the raw API rather than `llama_cpp.Llama` because every stage after this one needs what the
high-level class hides: tensor buffer overrides (`-ot exps=CPU`), the context's eval callback,
the logits of each step, and per-token timing.
"""

import codecs
import contextlib
import ctypes
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import UserError
from ..interrupts import deferred
from .native import NativeApi

llama_log = logging.getLogger("llama.cpp")

# Patterns of llama.cpp's `--cpu-moe` / `--n-cpu-moe`: the routed-expert tensors of a block.
EXPERT_TENSOR_PATTERN = r"\.ffn_(up|down|gate|gate_up)_exps"


def expert_overrides(n_cpu_moe_layers: int | None) -> tuple[tuple[str, str], ...]:
    """`--cpu-moe` (None: every layer) or `--n-cpu-moe N` (the first N blocks) as -ot overrides."""
    if n_cpu_moe_layers is None:
        return ((EXPERT_TENSOR_PATTERN, "CPU"),)
    return tuple((rf"^blk\.{il}{EXPERT_TENSOR_PATTERN}", "CPU") for il in range(n_cpu_moe_layers))


@dataclass(frozen=True)
class EngineConfig:
    model_path: str
    n_ctx: int = 0  # 0: min(4096, the context the model was trained for)
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = -1  # all layers on the GPU when the build has one
    overrides: tuple[tuple[str, str], ...] = ()  # (tensor-name regex, device name such as CPU or CUDA0)
    use_extra_bufts: bool = True  # repacked CPU weights; set False for byte-exact comparisons with uploads

    @classmethod
    def host_experts(cls, model_path: str, n_ctx: int = 0, host: bool = True) -> "EngineConfig":
        """Every routed expert in host memory as plain bytes (`host`): the placement the expert cache
        and stock `-ot exps=CPU` share; else stock all-on-GPU with the same settings."""
        return cls(
            str(model_path),
            n_ctx=n_ctx,
            use_extra_bufts=False,
            overrides=expert_overrides(None) if host else (),
        )


@dataclass(frozen=True)
class Sampling:
    """llama.cpp's sampler chain: penalties → top-k → top-p → min-p → temperature → a seeded draw.

    The defaults are greedy with every filter off, so library callers (tests, benchmarks, collection)
    that compare tokens with stock stay deterministic; the CLI passes llama.cpp's own defaults.
    Sampling only picks among the logits: it never changes what is computed, cached or predicted.
    """

    temperature: float = 0.0  # 0 or less: greedy
    top_p: float = 0.95  # 1.0: off
    seed: int = 0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0.0: off
    repeat_penalty: float = 1.0  # 1.0: off
    repeat_last_n: int = 64  # tokens the repeat penalty looks back over (llama.cpp's default)


@dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: list[float] = field(default_factory=list)  # one per generated token after the first

    @property
    def prefill_tok_s(self) -> float:
        return len(self.prompt_tokens) / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        total = sum(self.decode_seconds)
        return len(self.decode_seconds) / total if total else 0.0


_load_errors: list[list[str]] = []  # while loading: llama.cpp's error lines, kept for our message


@contextlib.contextmanager
def _quoting_load_errors() -> Iterator[list[str]]:
    """Collect llama.cpp's error lines instead of printing them, so a refused file ends in one line."""
    _load_errors.append([])
    try:
        yield _load_errors[-1]
    finally:
        _load_errors.pop()


def _first_error(errors: list[str]) -> str:
    """llama.cpp's most specific complaint (its first line), without the function name before it."""
    return errors[0].partition(": ")[2] or errors[0] if errors else "no reason given"


def _route_llama_log(llama_cpp: ModuleType) -> None:
    """llama.cpp logs through one process-wide callback: send it to `logging`, quiet by default."""
    # ggml_log_level (ggml.h): 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
    # Its warnings are advice for llama.cpp's own CLI (e.g. about mmap with CPU overrides, which is
    # what the cache wants): shown with --verbose, like its info lines; errors always.
    levels = {1: logging.DEBUG, 2: logging.INFO, 3: logging.INFO, 4: logging.ERROR}

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        message = text.decode(errors="replace").rstrip()
        if message and level == 4 and _load_errors:
            _load_errors[-1].append(message)  # the caller's one-line error will quote the first
            llama_log.debug(message)
        elif message:
            llama_log.log(levels.get(level, logging.DEBUG), message)

    _route_llama_log.callback = forward  # the C side keeps only a pointer
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


class Engine:
    """Owns a llama_model and a llama_context; close() frees both."""

    def __init__(self, llama_cpp: ModuleType, config: EngineConfig, context_params_hook=None) -> None:
        self.llama_cpp = llama_cpp
        self.api = NativeApi(llama_cpp)
        self.config = config
        self.model = None
        self.ctx = None
        if config.n_ctx < 0:
            raise UserError(f"-c {config.n_ctx} is negative: give a context size in tokens (0: the default)")
        _route_llama_log(llama_cpp)
        path = Path(config.model_path)
        if not path.is_file():
            raise UserError(f"model file {path} not found")
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = config.n_gpu_layers if self.api.gpus() else 0
        model_params.use_extra_bufts = config.use_extra_bufts
        self._overrides = self._override_array(config.overrides)
        if self._overrides is not None:
            model_params.tensor_buft_overrides = ctypes.cast(self._overrides, ctypes.c_void_p)
        with _quoting_load_errors() as errors, deferred():  # Ctrl-C: after the load, not in its log
            self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise UserError(
                f"llama.cpp could not load {path} ({_first_error(errors)}); re-download or re-create it "
                "(--verbose shows llama.cpp's log)"
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        if config.n_ctx > n_ctx_train > 0:
            self.close()
            raise UserError(
                f"context -c {config.n_ctx} exceeds the {n_ctx_train} tokens {path.name} was "
                f"trained for; use -c {n_ctx_train} or less"
            )
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = config.n_ctx or min(4096, n_ctx_train or 4096)
        ctx_params.n_batch = config.n_batch
        ctx_params.n_ubatch = min(config.n_batch, 512)
        if config.n_threads and config.n_threads > 0:  # like llama.cpp's -t, 0 or -1: its own choice
            ctx_params.n_threads = ctx_params.n_threads_batch = config.n_threads
        if context_params_hook is not None:
            context_params_hook(ctx_params)
        with _quoting_load_errors() as errors, deferred():
            self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            self.close()
            raise UserError(
                f"llama.cpp could not create a context of {ctx_params.n_ctx} tokens "
                f"({_first_error(errors)}); try a smaller -c"
            )
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_past = 0

    def _override_array(self, overrides: tuple[tuple[str, str], ...]):
        if not overrides:
            return None

        class Override(ctypes.Structure):
            _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]

        array = (Override * (len(overrides) + 1))()
        self._override_patterns = [pattern.encode() for pattern, _ in overrides]
        for slot, (pattern, (_, device)) in enumerate(zip(self._override_patterns, overrides, strict=True)):
            array[slot].pattern = pattern
            array[slot].buft = self.api.buffer_type(device)
        return array  # the last entry stays {NULL, NULL}: the terminator

    def close(self) -> None:
        if self.ctx:
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            self.llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        data = text.encode()
        capacity = len(data) + 16
        buffer = (self.llama_cpp.llama_token * capacity)()
        n = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_special, True)
        if n < 0:
            raise AssertionError(f"tokenizer needed {-n} slots for {len(data)} bytes")
        return list(buffer[:n])

    def token_bytes(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        n = self.llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = self.llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode(errors="replace")

    def reset(self) -> None:
        """Forget the KV cache: the next decode starts at position 0."""
        self.llama_cpp.llama_memory_clear(self.llama_cpp.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def decode(self, tokens: list[int], all_logits: bool = False) -> None:
        """Evaluate tokens at the next positions (sequence 0), in n_batch pieces.

        `all_logits` asks for every token's output, so the last layer's FFN also runs on every
        token (llama.cpp otherwise drops the rows it will not output before that FFN).
        """
        llama_cpp = self.llama_cpp
        n_batch = llama_cpp.llama_n_batch(self.ctx)  # llama.cpp lowers n_batch to a small -c; it asserts
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            if all_logits:
                batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
                try:
                    for i, token in enumerate(chunk):
                        batch.token[i] = token
                        batch.pos[i] = self.n_past + i
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = 0
                        batch.logits[i] = 1
                    batch.n_tokens = len(chunk)
                    with deferred():  # Ctrl-C: after this ubatch, not inside a hook
                        status = llama_cpp.llama_decode(self.ctx, batch)
                finally:
                    llama_cpp.llama_batch_free(batch)
            else:
                array = (llama_cpp.llama_token * len(chunk))(*chunk)
                batch = llama_cpp.llama_batch_get_one(array, len(chunk))
                with deferred():
                    status = llama_cpp.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status} at position {self.n_past}")
            self.n_past += len(chunk)

    def last_logits(self) -> np.ndarray:
        """Logits of the last evaluated token: [n_vocab] float32 (a copy)."""
        pointer = self.llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def make_sampler(self, sampling: Sampling):
        """A llama.cpp sampler chain (free it with llama_sampler_free) in the order of llama.cpp's
        common sampler; filters that are off are left out, so greedy is exactly argmax."""
        llama_cpp = self.llama_cpp
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())

        def add(sampler) -> None:
            llama_cpp.llama_sampler_chain_add(chain, sampler)

        if sampling.repeat_penalty != 1.0:
            add(
                llama_cpp.llama_sampler_init_penalties(
                    self.n_vocab, sampling.repeat_last_n, sampling.repeat_penalty, 0.0, 0.0
                )
            )
        if sampling.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        if sampling.min_p > 0:
            add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        add(llama_cpp.llama_sampler_init_dist(sampling.seed))
        return chain

    def generate(
        self, prompt: str | list[int], n_predict: int, sampling: Sampling = Sampling(), on_logits=None
    ) -> Iterator[tuple[int, Generation]]:
        """Prefill the prompt from position 0, then yield each new token with the running record.

        `on_logits(logits)` sees the logits each token was sampled from (for exactness tests).
        """
        if n_predict <= 0:
            raise UserError(f"-n must be at least 1 (got {n_predict})")
        prompt_tokens = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_tokens or (isinstance(prompt, str) and not prompt.strip()):
            raise UserError("the prompt is empty: give some text with -p")
        n_ctx = self.llama_cpp.llama_n_ctx(self.ctx)
        if len(prompt_tokens) + n_predict > n_ctx:
            raise UserError(
                f"prompt ({len(prompt_tokens)} tokens) + -n {n_predict} exceeds the context "
                f"-c {n_ctx}; raise -c or lower -n"
            )
        self.reset()
        record = Generation(prompt_tokens=prompt_tokens)
        sampler = self.make_sampler(sampling)
        if sampling.repeat_penalty != 1.0:  # the penalty counts the prompt, as llama.cpp's CLI does
            for token in prompt_tokens:
                self.llama_cpp.llama_sampler_accept(sampler, token)
        try:
            # llama_decode returns before a GPU has finished: each interval ends after sampling,
            # which waits for the logits, and excludes what the caller does between tokens.
            started = time.perf_counter()
            self.decode(prompt_tokens)
            for step in range(n_predict):
                if on_logits is not None:
                    on_logits(self.last_logits())
                token = self.llama_cpp.llama_sampler_sample(sampler, self.ctx, -1)
                elapsed = time.perf_counter() - started
                if step == 0:
                    record.prefill_seconds = elapsed
                else:
                    record.decode_seconds.append(elapsed)
                record.tokens.append(token)
                yield token, record
                if self.llama_cpp.llama_vocab_is_eog(self.vocab, token) or step == n_predict - 1:
                    break
                started = time.perf_counter()
                self.decode([token])
        finally:
            self.llama_cpp.llama_sampler_free(sampler)


def complete(
    engine: Engine, prompt: str | list[int], n_predict: int, sampling: Sampling = Sampling()
) -> Generation:
    """Generate to the end without streaming; the record holds tokens and timings."""
    record = Generation(prompt_tokens=[])
    for _, current in engine.generate(prompt, n_predict, sampling):
        record = current
    return record


def stream_text(engine: Engine, tokens: Iterator[tuple[int, Generation]]) -> Iterator[tuple[str, Generation]]:
    """Decode token bytes to text incrementally (a UTF-8 character may span tokens)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token, record in tokens:
        yield decoder.decode(engine.token_bytes(token)), record
