"""`edge-preattn serve` through a real HTTP client on localhost, with the packaged model and its
predictors (top1 prefetch): completions plain and streamed, chat, two clients at once, bad requests
answered with 4xx JSON while the server keeps serving, /metrics, and Ctrl-C."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from edge_preattn import cli
from edge_preattn.runtime import serve
from edge_preattn.runtime.service import StopScanner, render_chat

PROMPT = "def fibonacci(n):"
N = 12
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def server(llama_lib):
    """The server in this process (the library is loaded once per process), on a free port."""
    args = cli.build_parser("serve").parse_args(["serve", "--port", "0", "-n", "8"])
    with serve.serving(args) as (http_server, service):
        thread = threading.Thread(target=http_server.serve_forever, daemon=True)
        thread.start()
        try:
            yield http_server.server_address[1], service
        finally:
            http_server.shutdown()
            thread.join(TIMEOUT_S)


def request(port: int, method: str, path: str, body: object = None, headers: dict | None = None):
    """(status, parsed JSON or the raw text of an event stream)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        raw = response.read().decode()
        if response.getheader("Content-Type") == "text/event-stream":
            return response.status, raw
        return response.status, json.loads(raw)
    finally:
        connection.close()


def complete(port: int, **fields) -> dict:
    status, answer = request(port, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": N, **fields})
    assert status == 200, answer
    return answer


def events(raw: str) -> list:
    """The server-sent events' payloads; the stream must end with [DONE]."""
    lines = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def test_a_completion_at_temperature_0(server):
    port, _ = server
    answer = complete(port, temperature=0)
    (choice,) = answer["choices"]
    assert answer["object"] == "text_completion" and answer["model"] == "edge-moe-default"
    assert choice["finish_reason"] in ("length", "stop") and choice["text"]
    assert answer["usage"]["completion_tokens"] <= N and answer["usage"]["prompt_tokens"] > 0
    assert complete(port, temperature=0)["choices"][0]["text"] == choice["text"]  # greedy repeats
    seeded = [complete(port, seed=11, temperature=1.0)["choices"][0]["text"] for _ in range(2)]
    assert seeded[0] == seeded[1]  # a request's seed repeats its sampled text


def test_a_streamed_completion_is_the_same_text_in_pieces(server):
    port, _ = server
    status, raw = request(
        port, "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True}
    )
    assert status == 200
    chunks = events(raw)
    assert len(chunks) > 2 and all(chunk["object"] == "text_completion" for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    streamed = "".join(chunk["choices"][0]["text"] for chunk in chunks)
    assert streamed == complete(port, temperature=0)["choices"][0]["text"]


def test_two_clients_at_once_are_both_answered_as_one_alone(server):
    port, _ = server
    alone = complete(port, temperature=0)["choices"][0]["text"]
    served_before = request(port, "GET", "/metrics")[1]["requests_served"]
    answers: list = [None, None]

    def client(slot: int) -> None:
        answers[slot] = complete(port, temperature=0)["choices"][0]["text"]

    threads = [threading.Thread(target=client, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert answers == [alone, alone]
    metrics = request(port, "GET", "/metrics")[1]
    assert metrics["requests_served"] == served_before + 2 and metrics["requests_waiting"] == 0


def test_chat_without_a_template_is_a_transcript(server):
    port, _ = server
    body = {"messages": [{"role": "user", "content": "Write a sort function."}], "max_tokens": N}
    status, answer = request(port, "POST", "/v1/chat/completions", {**body, "temperature": 0})
    assert status == 200 and answer["object"] == "chat.completion"
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert "\nuser:" not in message["content"]
    status, raw = request(port, "POST", "/v1/chat/completions", {**body, "temperature": 0, "stream": True})
    chunks = events(raw)
    assert status == 200 and chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]


def test_stop_sequences_cut_the_text(server):
    port, _ = server
    text = complete(port, temperature=0)["choices"][0]["text"]
    stop = text.strip()[2:5]  # somewhere inside the greedy text
    answer = complete(port, temperature=0, stop=[stop])["choices"][0]
    assert answer["finish_reason"] == "stop" and answer["text"] == text[: text.index(stop)]
    _, raw = request(
        port,
        "POST",
        "/v1/completions",
        {"prompt": PROMPT, "max_tokens": N, "temperature": 0, "stop": stop, "stream": True},
    )
    assert "".join(c["choices"][0]["text"] for c in events(raw)) == answer["text"]


def test_the_stop_scanner_never_sends_part_of_a_stop():
    scanner = StopScanner(["</s>"])
    assert scanner.feed("ab<") == ("ab", False)  # "<" may begin "</s>": held back
    assert scanner.feed("/") == ("", False)
    assert scanner.feed("x") == ("</x", False)  # it did not
    assert scanner.feed("y</") == ("y", False)
    assert scanner.feed("s>tail") == ("", True)


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_model_template_renders_the_chat():
    prompt, has_specials = render_chat(CHATML, [{"role": "user", "content": "hi"}], "<s>", "</s>")
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" and has_specials
    prompt, has_specials = render_chat(None, [{"role": "user", "content": "hi"}], "<s>", "</s>")
    assert prompt == "user: hi\nassistant:" and not has_specials


def test_a_gguf_with_a_chat_template_gets_its_own_prompt(llama_lib, tmp_path, monkeypatch):
    import gguf

    from edge_preattn.model.synth import write_synthetic

    add_eos = gguf.GGUFWriter.add_add_eos_token

    def add_eos_and_template(writer, value):  # the synthetic model's header, with a chat template
        add_eos(writer, value)
        writer.add_chat_template(CHATML)

    monkeypatch.setattr(gguf.GGUFWriter, "add_add_eos_token", add_eos_and_template)
    path = tmp_path / "tiny-chat.gguf"
    write_synthetic("tiny", path, progress=False)
    args = cli.build_parser("serve").parse_args(["serve", "-m", str(path), "--port", "0", "--temp", "0"])
    with serve.serving(args) as (_, service):
        job = service.chat_job({"messages": [{"role": "user", "content": "hi"}]})
        rendered = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert job.prompt_tokens == service.loaded.engine.tokenize(rendered, add_special=False)
        assert job.stops == []  # the model ends its turn with its end-of-generation token


BAD_REQUESTS = {
    "not JSON": ("/v1/completions", b"{bad", 400),
    "not an object": ("/v1/completions", b"[1, 2]", 400),
    "prompt a number": ("/v1/completions", {"prompt": 5}, 400),
    "empty prompt": ("/v1/completions", {"prompt": "  "}, 400),
    "token id out of range": ("/v1/completions", {"prompt": [10**9]}, 400),
    "max_tokens 0": ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400),
    "max_tokens past the context": ("/v1/completions", {"prompt": "x", "max_tokens": 10**6}, 400),
    "max_tokens a string": ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400),
    "max_tokens a bool": ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400),
    "n_predict negative": ("/v1/completions", {"prompt": "x", "n_predict": -1}, 400),
    "temperature a string": ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400),
    "temperature negative": ("/v1/completions", {"prompt": "x", "temperature": -1}, 400),
    "top_p above 1": ("/v1/completions", {"prompt": "x", "top_p": 2}, 400),
    "top_k fractional": ("/v1/completions", {"prompt": "x", "top_k": 1.5}, 400),
    "seed out of range": ("/v1/completions", {"prompt": "x", "seed": 2**40}, 400),
    "stream a string": ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400),
    "stop a number": ("/v1/completions", {"prompt": "x", "stop": 3}, 400),
    "n of 2": ("/v1/completions", {"prompt": "x", "n": 2}, 400),
    "no messages": ("/v1/chat/completions", {"messages": []}, 400),
    "message without content": ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    "message not an object": ("/v1/chat/completions", {"messages": ["hi"]}, 400),
    "unknown endpoint": ("/v1/embeddings", {"input": "x"}, 404),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_is_a_4xx_json_error_and_the_server_goes_on(server, case):
    port, _ = server
    path, body, expected = BAD_REQUESTS[case]
    status, answer = request(port, "POST", path, body)
    assert status == expected, answer
    assert set(answer) == {"error"} and answer["error"]["message"] and answer["error"]["type"]
    assert complete(port, max_tokens=2, frobnicate=True)["usage"]["completion_tokens"] >= 1  # unknown: ok


def test_a_body_without_a_length_is_refused(server):
    port, _ = server
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    try:
        connection.putrequest("POST", "/v1/completions")
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 411 and "Content-Length" in json.loads(response.read())["error"]["message"]
    finally:
        connection.close()


def test_models_and_metrics(server):
    port, _ = server
    complete(port)
    status, models = request(port, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["edge-moe-default"]
    for path in ("/metrics", "/stats"):
        status, metrics = request(port, "GET", path)
        assert status == 200 and metrics["mode"] == "top1" and metrics["slots_per_layer"] == 8
        assert metrics["requests_served"] >= 1 and metrics["generated_tokens"] >= 1
        assert (
            metrics["decode_tok_s"] > 0 and 0 <= metrics["hit_rate"] <= 1 and metrics["prefetch_issued"] > 0
        )
    assert request(port, "GET", "/nowhere")[0] == 404


def test_oracle_mode_and_a_bad_port_are_one_line_errors(llama_lib, capsys):
    for argv, message in (
        (["serve", "--mode", "oracle"], "--mode oracle replays one recorded run"),
        (["serve", "--port", "70000"], "--port 70000 is not a port"),
    ):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_taken_port_is_a_one_line_error(llama_lib, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert cli.main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen on 127.0.0.1" in err[0] and "--port" in err[0], err


def test_ctrl_c_stops_the_server_with_130(lib_dir):
    """The real command in a subprocess: it serves a request, then SIGINT ends it cleanly."""
    env = {**os.environ, "EDGE_PREATTN_LIB": str(lib_dir)}
    command = [sys.executable, "-m", "edge_preattn.cli", "serve", "--port", "0", "-n", "4"]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = [process.stderr.readline() for _ in range(2)]
        assert "listening on http://127.0.0.1:" in lines[1], lines
        port = int(lines[1].split("127.0.0.1:")[1].split("/")[0])
        assert complete(port, max_tokens=4)["usage"]["completion_tokens"] >= 1
        process.send_signal(signal.SIGINT)
        assert process.wait(TIMEOUT_S) == 130
        assert process.stderr.read().strip() == "edge-preattn: interrupted"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
