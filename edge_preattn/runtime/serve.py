"""`edge-preattn serve`: an OpenAI-compatible HTTP server on the patched llama.cpp with the expert cache.

It takes `run`'s model, placement, sampling and cache options (one engine, one expert cache, the
predictors), and answers POST /v1/completions and /v1/chat/completions (streamed as server-sent events
with `"stream": true`), GET /v1/models, and GET /metrics (or /stats): requests served, tokens/s, and
the cache's hit rate. Requests queue on one lock and generate one at a time: llama.cpp's context,
the slot banks and the controller's counters belong to one sequence, so nothing runs concurrently on
them. The server is the standard library's, so the package needs no web framework.
"""

import argparse
import contextlib
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import UserError
from . import run
from .service import BadRequest, Job, Service

log = logging.getLogger(__name__)

HELP = "serve the OpenAI completions API from a MoE GGUF (default: the packaged model) with the expert cache"
EXAMPLES = """\
  edge-preattn serve                                 # packaged model, top1 prefetch, http://127.0.0.1:8080
  edge-preattn serve -m model.gguf --mode top1 --predictors preds/ --vram-budget 6GiB --port 9000
  edge-preattn serve -m model.gguf --n-cpu-moe 20    # stock placement
  curl -s localhost:8080/v1/completions -d '{"prompt": "def add(a, b):", "max_tokens": 32}'
  curl -N localhost:8080/v1/completions -d '{"prompt": "def f(x):", "stream": true}'  # server-sent events
  curl localhost:8080/v1/chat/completions -d '{"messages": [{"role": "user", "content": "hi"}]}'
  curl -s localhost:8080/metrics                     # requests, tokens/s, cache hit rate
"""

MAX_BODY_BYTES = 1 << 20


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n",
        "--n-predict",
        type=int,
        default=128,
        help="tokens a request generates when it gives no max_tokens (default 128)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=8080, help="port to listen on, 0: any free one (default 8080)"
    )
    run.add_engine_args(parser)


class Handler(BaseHTTPRequestHandler):
    """One connection; `server.service` does the work."""

    protocol_version = "HTTP/1.1"
    server_version = "edge-preattn"
    timeout = 60  # a client that stops reading cannot hold the engine for longer

    @property
    def service(self) -> Service:
        return self.server.service

    def log_message(self, format: str, *args) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = self.path.partition("?")[0].rstrip("/")
        if path == "/v1/models":
            model = {"id": self.service.model_id, "object": "model", "created": 0, "owned_by": "edge-preattn"}
            self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        elif path in ("/metrics", "/stats"):
            self._send_json(HTTPStatus.OK, self.service.metrics())
        elif path == "/health":
            self._send_json(HTTPStatus.OK, {"status": "ok"})
        else:
            self._error(BadRequest(f"no such endpoint: GET {path}", HTTPStatus.NOT_FOUND, "not_found_error"))

    def do_POST(self) -> None:
        path = self.path.partition("?")[0].rstrip("/")
        routes: dict[str, Callable[[dict], Job]] = {
            "/v1/completions": self.service.completion_job,
            "/v1/chat/completions": self.service.chat_job,
        }
        try:
            if path not in routes:
                raise BadRequest(f"no such endpoint: POST {path}", HTTPStatus.NOT_FOUND, "not_found_error")
            job = routes[path](self._read_json())
            if job.stream:
                self._stream(job)
            else:
                self._answer(job)
        except BadRequest as error:
            self._error(error)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client left; the engine is free again
        except Exception as error:  # the server keeps serving; the client learns what failed
            log.exception("request failed")
            self._error(BadRequest(f"generation failed: {error}", HTTPStatus.INTERNAL_SERVER_ERROR))

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise BadRequest("a request body with a Content-Length is required", HTTPStatus.LENGTH_REQUIRED)
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BadRequest(f"the body is not JSON: {error}") from error
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _answer(self, job: Job) -> None:
        *pieces, (finish, usage) = self.service.generate(job)
        text = "".join(pieces)
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        self._send_json(
            HTTPStatus.OK, {**_envelope(job, self.service.model_id), "choices": [choice], "usage": usage}
        )

    def _stream(self, job: Job) -> None:
        """Server-sent events: one `data:` line per piece, the finish reason, then `data: [DONE]`."""
        envelope = _envelope(job, self.service.model_id, chunk=True)
        started = False
        try:
            for item in self.service.generate(job):
                if not started:  # the headers wait for the engine, so a refused request is still a 4xx
                    self.send_response(HTTPStatus.OK)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.close_connection = True
                    started = True
                    if job.chat:
                        self._event({**envelope, "choices": [_delta(job, {"role": "assistant"}, None)]})
                if isinstance(item, str):
                    self._event({**envelope, "choices": [_delta(job, item, None)]})
                else:
                    self._event({**envelope, "choices": [_delta(job, "", item[0])]})
        except Exception as error:
            if not started or isinstance(error, OSError):
                raise
            log.exception("streamed request failed")  # the status line is sent: say so in the stream
            self.service.count_rejected(HTTPStatus.INTERNAL_SERVER_ERROR)
            self._event({"error": {"message": f"generation failed: {error}", "type": "server_error"}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, payload: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _error(self, error: BadRequest) -> None:
        self.service.count_rejected(error.status)
        self.close_connection = True  # the body may be unread: the next bytes are no request
        self._send_json(error.status, {"error": {"message": str(error), "type": error.kind}})

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


def _envelope(job: Job, model_id: str, chunk: bool = False) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if job.chat else "text_completion"
    prefix = "chatcmpl" if job.chat else "cmpl"
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


def _delta(job: Job, content: str | dict, finish: str | None) -> dict:
    if job.chat:
        delta = content if isinstance(content, dict) else ({"content": content} if content else {})
        return {"index": 0, "delta": delta, "finish_reason": finish}
    return {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}


@contextlib.contextmanager
def serving(args: argparse.Namespace) -> Iterator[tuple[ThreadingHTTPServer, Service]]:
    """The model loaded as `run` loads it and a bound server; serve_forever() it, shutdown() to stop.
    On leaving, the generation in progress stops at its next token before the engine is freed."""
    if args.mode == "oracle":
        raise UserError("--mode oracle replays one recorded run; a server's prompts are new: use top1 or lru")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port: give 0-65535 (0: any free one)")
    setup = run.prepare(args)
    try:  # bound before the model loads, so a taken port fails at once
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as error:
        raise UserError(
            f"cannot listen on {args.host}:{args.port} ({error.strerror or error}); choose another --port"
        ) from error
    try:
        with run.open_engine(args, setup) as loaded:
            server.service = Service(
                setup,
                loaded,
                args.n_predict,
                None if run.is_random_seed(args.seed) else args.seed,
            )
            try:
                yield server, server.service
            finally:
                server.service.close()
    finally:
        server.server_close()


def main(args: argparse.Namespace) -> int:
    with serving(args) as (server, service):
        host, port = server.server_address[:2]
        seed = "a random seed per request" if service.seed is None else None
        sampling = run.describe_sampling(service.setup.sampling, seed)
        print(f"{run.describe(service.setup, service.loaded, args)} · {sampling}", file=sys.stderr)
        print(f"listening on http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        server.serve_forever()
    return 0
