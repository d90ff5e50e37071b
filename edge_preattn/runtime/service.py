"""The engine behind `serve`, without HTTP: it checks a request into a job (prompt tokens, length,
sampling, stop sequences; chat through the model's template), generates one job at a time on the one
engine and expert cache, and keeps the totals /metrics reports. Split from serve.py, which keeps the
HTTP handler and the verb."""

import json
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus

from ..errors import UserError
from ..model.engine import Engine, Sampling, stream_text
from . import run
from .stats import run_stats

MAX_STOPS = 4  # as OpenAI's API
# Chat without a template in the model: a role-labelled transcript, ended where the model would
# start the user's next turn.
PLAIN_CHAT_STOP = "\nuser:"
# Request fields that set sampling carry Sampling's own names (OpenAI's, and llama.cpp server's for
# top_k, min_p and repeat_penalty): run.SAMPLING_FLAGS lists them.
INTEGER_FIELDS = {"top_k", "seed"}


class BadRequest(Exception):
    """A request the server refuses: answered with `status` and an OpenAI-style error object."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST, kind: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")


@dataclass
class Job:
    """One checked request: what to generate and how to answer."""

    prompt_tokens: list[int]
    n_predict: int
    sampling: Sampling
    stream: bool
    stops: list[str]
    chat: bool


@dataclass
class Totals:
    """Counters since the server started, read by /metrics."""

    started: float = field(default_factory=time.time)
    requests_served: int = 0
    requests_rejected: int = 0
    requests_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    cache: dict = field(default_factory=dict)


class StopScanner:
    """Cuts the text at the first stop sequence, holding back what may be the start of one, so a
    stream never shows part of a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that is safe to send now, and whether a stop sequence was reached."""
        self.pending += piece
        found = [at for at in (self.pending.find(stop) for stop in self.stops) if at >= 0]
        if found:
            text, self.pending = self.pending[: min(found)], ""
            return text, True
        held = max((self._prefix_overlap(stop) for stop in self.stops), default=0)
        cut = len(self.pending) - held
        text, self.pending = self.pending[:cut], self.pending[cut:]
        return text, False

    def _prefix_overlap(self, stop: str) -> int:
        return next((n for n in range(len(stop) - 1, 0, -1) if self.pending.endswith(stop[:n])), 0)

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text


def render_chat(
    template: str | None, messages: list[dict], bos_token: str, eos_token: str
) -> tuple[str, bool]:
    """The prompt of a chat: the model's own template through llama-cpp-python's Jinja2 formatter
    (it writes the special tokens itself: True), else a role-labelled transcript (False)."""
    if template is None:
        lines = [f"{message['role']}: {message['content']}" for message in messages]
        return "\n".join([*lines, "assistant:"]), False
    from jinja2 import TemplateError
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    try:
        formatted = Jinja2ChatFormatter(template, eos_token=eos_token, bos_token=bos_token)(messages=messages)
    except (TemplateError, ValueError) as error:
        raise BadRequest(f"the model's chat template refused these messages: {error}") from error
    return formatted.prompt, True


class Service:
    """The engine behind the server: checks requests, generates one at a time, keeps the totals."""

    def __init__(self, setup: run.Setup, loaded: run.Loaded, n_predict: int, seed: int | None) -> None:
        """`seed`: --seed N, which every request without a seed of its own samples with (None: each
        request draws one)."""
        self.setup, self.loaded, self.n_predict, self.seed = setup, loaded, n_predict, seed
        self.model_id = setup.model.stem
        engine = loaded.engine
        self.n_ctx = engine.llama_cpp.llama_n_ctx(engine.ctx)
        template = engine.llama_cpp.llama_model_chat_template(engine.model, None)
        self.chat_template = template.decode(errors="replace") if template else None
        self.special_texts = _token_text(engine, "bos"), _token_text(engine, "eos")  # templates write them
        self.engine_lock = threading.Lock()  # one generation at a time: the cache serves one sequence
        self.vocab_lock = threading.Lock()  # tokenizing runs beside a generation, never after close()
        self.totals_lock = threading.Lock()
        self.totals = Totals()
        self.waiting = 0
        self.closing = threading.Event()

    # --- requests -------------------------------------------------------------------------------

    def completion_job(self, body: dict) -> Job:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # OpenAI's clients send a one-prompt batch as a list
        if isinstance(prompt, str):
            if not prompt.strip():
                raise BadRequest("'prompt' is empty")
            tokens = self._tokenize(prompt, add_special=True)
        elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
            n_vocab = self.loaded.engine.n_vocab
            if not all(0 <= t < n_vocab for t in prompt):
                raise BadRequest(f"'prompt' holds token ids outside the vocabulary (0-{n_vocab - 1})")
            tokens = list(prompt)
        else:
            raise BadRequest("'prompt' must be a string (or a list of token ids); one prompt per request")
        return self._job(body, tokens, chat=False, stops=[])

    def chat_job(self, body: dict) -> Job:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        checked = [self._message(message, i) for i, message in enumerate(messages)]
        prompt, has_specials = render_chat(self.chat_template, checked, *self.special_texts)
        tokens = self._tokenize(prompt, add_special=not has_specials)
        return self._job(body, tokens, chat=True, stops=[] if has_specials else [PLAIN_CHAT_STOP])

    def _tokenize(self, text: str, add_special: bool) -> list[int]:
        with self.vocab_lock:
            if self.closing.is_set():
                raise BadRequest("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            return self.loaded.engine.tokenize(text, add_special=add_special)

    @staticmethod
    def _message(message: object, index: int) -> dict:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{index}] must be an object with a string 'role'")
        content = message.get("content")
        if isinstance(content, list):  # content parts: the text ones
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise BadRequest(f"messages[{index}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a string")
        return {"role": message["role"], "content": content}

    def _job(self, body: dict, tokens: list[int], chat: bool, stops: list[str]) -> Job:
        room = self.n_ctx - len(tokens)
        if room < 1:
            raise BadRequest(f"the prompt ({len(tokens)} tokens) fills the context of {self.n_ctx} tokens")
        names = ("max_completion_tokens", "max_tokens", "n_predict") if chat else ("max_tokens", "n_predict")
        given = [name for name in names if body.get(name) is not None]
        if given:
            n_predict = body[given[0]]
            if not _is_int(n_predict) or not 1 <= n_predict <= room:
                raise BadRequest(
                    f"'{given[0]}' must be an integer from 1 to {room} (the context of {self.n_ctx} "
                    f"tokens less the prompt's {len(tokens)}); got {json.dumps(n_predict)}"
                )
        else:
            n_predict = min(self.n_predict, room)
        if body.get("n", 1) != 1:
            raise BadRequest("'n' must be 1: one completion per request")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) for s in stop):
            raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOPS} strings")
        return Job(tokens, n_predict, self._sampling(body), stream, stops + stop, chat)

    def _sampling(self, body: dict) -> Sampling:
        values = {name: getattr(self.setup.sampling, name) for name in run.SAMPLING_FLAGS}
        values["seed"] = run.RANDOM_SEED if self.seed is None else self.seed
        for name in run.SAMPLING_FLAGS:
            value = body.get(name)
            if value is None:
                continue
            if not (_is_int(value) if name in INTEGER_FIELDS else _is_number(value)):
                kind = "an integer" if name in INTEGER_FIELDS else "a number"
                raise BadRequest(f"'{name}' must be {kind}; got {json.dumps(value)}")
            values[name] = value
        try:
            run.check_sampling(values, names={name: f"'{name}'" for name in run.SAMPLING_FLAGS})
        except UserError as error:
            raise BadRequest(str(error)) from error
        return run.sampling_from(values)

    # --- generation -----------------------------------------------------------------------------

    def generate(self, job: Job) -> Iterator[str | tuple[str, dict]]:
        """Text pieces as they come, then ("finish reason", usage). Holds the engine for the whole
        generation, so another request waits and the cache only ever serves one sequence."""
        with self.totals_lock:
            self.waiting += 1
        try:
            self.engine_lock.acquire()
        finally:
            with self.totals_lock:
                self.waiting -= 1
        try:
            if self.closing.is_set():
                raise BadRequest("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
            yield from self._generate_locked(job)
        finally:
            self.engine_lock.release()

    def _generate_locked(self, job: Job) -> Iterator[str | tuple[str, dict]]:
        engine = self.loaded.engine
        tokens = engine.generate(job.prompt_tokens, job.n_predict, job.sampling)
        scanner, record, finish = StopScanner(job.stops), None, "length"
        try:
            for piece, current in stream_text(engine, tokens):
                record = current
                text, stopped = scanner.feed(piece)
                if text:
                    yield text
                if stopped:
                    finish = "stop"
                    break
                if self.closing.is_set():
                    break
            else:
                last = record.tokens[-1] if record and record.tokens else None
                if last is not None and engine.llama_cpp.llama_vocab_is_eog(engine.vocab, last):
                    finish = "stop"
            if finish == "length" and (rest := scanner.flush()):
                yield rest
        finally:
            tokens.close()
            if record is not None:
                self._count(record)
        generated = len(record.tokens) if record else 0
        usage = {
            "prompt_tokens": len(job.prompt_tokens),
            "completion_tokens": generated,
            "total_tokens": len(job.prompt_tokens) + generated,
        }
        yield finish, usage

    def _count(self, record) -> None:
        """Add one generation to the totals; the cache's counters are read here, under the engine lock."""
        stats = run_stats(record, self.loaded.engine, self.loaded.runtime)
        cache = {key: stats[key] for key in CACHE_KEYS if key in stats}
        with self.totals_lock:
            totals = self.totals
            totals.requests_served += 1
            totals.prompt_tokens += len(record.prompt_tokens)
            totals.generated_tokens += len(record.tokens)
            totals.prefill_seconds += record.prefill_seconds
            totals.decode_tokens += len(record.decode_seconds)
            totals.decode_seconds += sum(record.decode_seconds)
            totals.cache = cache

    def count_rejected(self, status: int) -> None:
        with self.totals_lock:
            if status >= 500:
                self.totals.requests_failed += 1
            else:
                self.totals.requests_rejected += 1

    def metrics(self) -> dict:
        with self.totals_lock:
            t = self.totals
            return {
                "model": self.model_id,
                "mode": self.loaded.mode,
                "slots_per_layer": self.loaded.n_slots,
                "uptime_s": round(time.time() - t.started, 1),
                "requests_served": t.requests_served,
                "requests_rejected": t.requests_rejected,
                "requests_failed": t.requests_failed,
                "requests_waiting": self.waiting,
                "prompt_tokens": t.prompt_tokens,
                "generated_tokens": t.generated_tokens,
                "prefill_tok_s": round(t.prompt_tokens / t.prefill_seconds, 2) if t.prefill_seconds else 0.0,
                "decode_tok_s": round(t.decode_tokens / t.decode_seconds, 2) if t.decode_seconds else 0.0,
                **t.cache,
            }

    def close(self) -> None:
        """Stop the generation in progress at its next token and wait for it, so the engine can go."""
        self.closing.set()
        with self.engine_lock, self.vocab_lock:
            pass


# Cache counters /metrics shows: since the server started (the controller counts over its lifetime).
CACHE_KEYS = (
    "hit_rate",
    "hits_per_token",
    "misses_per_token",
    "cpu_per_token",
    "late_per_token",
    "prefetch_issued",
    "prefetch_hits",
    "prefetch_wasted",
    "prefetch_late",
    "cached_tokens",
    "bank_bytes",
    "uploads_are_memory_copies",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (isinstance(value, float) and math.isfinite(value)) or _is_int(value)


def _token_text(engine: Engine, which: str) -> str:
    """The text of the BOS or EOS token, which chat templates write themselves."""
    token = getattr(engine.llama_cpp, f"llama_vocab_{which}")(engine.vocab)
    if token < 0:
        return ""
    return (engine.llama_cpp.llama_vocab_get_text(engine.vocab, token) or b"").decode(errors="replace")
