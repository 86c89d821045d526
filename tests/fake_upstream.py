#!/usr/bin/env python3
"""A fast fake OpenAI upstream: fixed answers, no model.

The tests start it as a process (``tests/conftest.py``) to stand in for an OpenAI-compatible
server, and the overhead benchmark uses it to measure what the gateway itself costs, so it
has to cost next to nothing: a raw asyncio HTTP/1.1 server (httptools parser, uvloop when
importable), keep-alive, and every response prepared as bytes before the first request.

    POST /v1/chat/completions   a fixed ``chat.completion``
    POST /v1/completions        a fixed ``text_completion``
    GET  /v1/models             the one model
    GET  /health                ``ok``
    anything else               404, an OpenAI-shaped error

Plain answers carry ``usage`` {prompt_tokens 12, completion_tokens 12, total_tokens 24}.
With ``"stream": true`` in the request body the answer is ``text/event-stream`` (chunked):
``--stream-chunks`` delta events, a finish event, a usage event (12 prompt tokens, one
completion token per delta) only when ``stream_options.include_usage`` is true, then
``data: [DONE]``. The request body is searched for those two flags, never parsed. A chat
request with ``"logprobs": true`` gets each token's log-probability too (``logprobs.content``,
-0.05 each, no alternatives), as a cascade's probe asks for them.

    python tests/fake_upstream.py [--host 127.0.0.1] [--port 0] [--workers 1]
        [--model fake-model] [--delay-ms 0] [--stream-chunks 4] [--stream-chunk-delay-ms 0]

``--port 0`` picks a free port; ``READY <port>`` is printed on stdout once it listens.
``--workers N`` runs N processes, each with its own socket on the port (SO_REUSEPORT).
``--delay-ms`` waits (without blocking the loop) before answering a completion request.
``--record FILE`` appends the ``X-Request-Id`` of every completion request to FILE, one per
line, as it arrives (tests count how often each request reached the upstream).

In-process use: ``server = await start(Options(...), "127.0.0.1", 0)`` on a running loop.
Every request is answered by :meth:`Connection.answer`, the one place that picks a response.

Faults: a completion request whose ``X-Request-Id`` is ``fault-<name>`` (optionally
followed by ``.<anything>``) gets the broken answer :data:`FAULTS` names instead (the
gateway forwards its request id to the upstream, so a test picks the fault per request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import struct
import sys
import traceback
from dataclasses import dataclass

import httptools

try:
    import uvloop
except ImportError:  # uvicorn[standard] brings it where it builds (not on Windows)
    uvloop = None

CREATED = 1700000000
PROMPT_TOKENS = 12
TEXT = ("Hello", "!", " This", " is", " a", " fixed", " reply", " from", " the", " fake",
        " upstream", ".")  # 12 pieces: the 12 completion tokens of the plain answer
END_OF_CHUNKS = b"0\r\n\r\n"

# (method, path) -> route name
ROUTES = {
    (b"POST", b"/v1/chat/completions"): "chat",
    (b"POST", b"/v1/completions"): "completions",
    (b"GET", b"/v1/models"): "models",
    (b"GET", b"/health"): "health",
}
PLAIN, STREAM, STREAM_WITH_USAGE = 0, 1, 2


@dataclass(frozen=True)
class Options:
    model: str = "fake-model"
    delay_ms: float = 0.0
    stream_chunks: int = 4
    stream_chunk_delay_ms: float = 0.0
    #: A file to append each completion request's X-Request-Id to (None: nothing kept).
    record: str | None = None


def dumps(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def response(status: bytes, body: bytes, keep_alive: bool,
             content_type: bytes = b"application/json") -> bytes:
    return b"".join((b"HTTP/1.1 ", status, b"\r\nContent-Type: ", content_type,
                     b"\r\nContent-Length: ", str(len(body)).encode(),
                     b"\r\nConnection: ", b"keep-alive" if keep_alive else b"close",
                     b"\r\n\r\n", body))


def stream_head(keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: "
            + (b"keep-alive" if keep_alive else b"close") + b"\r\n\r\n")


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj) -> bytes:
    return http_chunk(b"data: " + (obj if isinstance(obj, bytes) else dumps(obj)) + b"\n\n")


def error_body(message: str, code: str) -> bytes:
    return dumps({"error": {"message": message, "type": "invalid_request_error",
                            "param": None, "code": code}})


class Generation:
    """One completion endpoint's answers, prepared: the plain response, and the stream as
    HTTP chunks (``frames``, with or without the usage event) and as whole responses."""

    def __init__(self, body: dict, chunk: dict, pieces: list[dict], finish: dict):
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(pieces),
                 "total_tokens": PROMPT_TOKENS + len(pieces)}
        events = [sse({**chunk, "choices": [c]}) for c in (*pieces, finish)]
        done = sse(b"[DONE]")
        self.plain = {ka: response(b"200 OK", dumps(body), ka) for ka in (True, False)}
        self.frames = {STREAM: (*events, done),
                       STREAM_WITH_USAGE: (*events, sse({**chunk, "choices": [], "usage": usage}),
                                           done)}
        self.whole = {(ka, mode): stream_head(ka) + b"".join(frames) + END_OF_CHUNKS
                      for ka in (True, False) for mode, frames in self.frames.items()}


def prepare(options: Options) -> dict[str, object]:
    """Every route's answer: a :class:`Generation`, or ``{keep_alive: bytes}``."""
    model, n = options.model, options.stream_chunks
    usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": len(TEXT),
             "total_tokens": PROMPT_TOKENS + len(TEXT)}
    common = {"created": CREATED, "model": model, "system_fingerprint": "fp_fake"}
    words = [TEXT[i % len(TEXT)] for i in range(n)]
    def chat_answer(logprobs: bool) -> Generation:
        """The chat answer, each token with its log-probability when ``logprobs``."""
        def scored(pieces: list[str]) -> dict | None:
            return {"content": [{"token": w, "logprob": -0.05, "bytes": list(w.encode()),
                                 "top_logprobs": []} for w in pieces]} if logprobs else None

        return Generation(
            {"id": "chatcmpl-fake", "object": "chat.completion", **common,
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(TEXT)},
                          "logprobs": scored(list(TEXT)), "finish_reason": "stop"}],
             "usage": usage},
            {"id": "chatcmpl-fake", "object": "chat.completion.chunk", **common},
            [{"index": 0,
              "delta": {"role": "assistant", "content": w} if i == 0 else {"content": w},
              "logprobs": scored([w]), "finish_reason": None} for i, w in enumerate(words)],
            {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"})

    text = Generation(
        {"id": "cmpl-fake", "object": "text_completion", **common,
         "choices": [{"index": 0, "text": "".join(TEXT), "logprobs": None,
                      "finish_reason": "stop"}], "usage": usage},
        {"id": "cmpl-fake", "object": "text_completion", **common},
        [{"index": 0, "text": w, "logprobs": None, "finish_reason": None} for w in words],
        {"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"})
    models = dumps({"object": "list", "data": [{"id": model, "object": "model",
                                                "created": CREATED, "owned_by": "fake-upstream"}]})
    return {"chat": chat_answer(False), "chat-logprobs": chat_answer(True), "completions": text,
            "models": {ka: response(b"200 OK", models, ka) for ka in (True, False)},
            "health": {ka: response(b"200 OK", b"ok", ka, b"text/plain") for ka in (True, False)}}


#: The broken answers, by name (see :meth:`Connection.fault`).
FAULTS = {
    "usage-string": "usage is a string",
    "data-int": "the body / an event is the JSON number 123",
    "data-list": "the body / an event is the JSON list [1,2]",
    "content-int": "the content / a delta's content is a number",
    "not-sse": "a stream request answered with a plain JSON 200",
    "truncated": "the body ends early: 2 deltas then the end, no finish, no [DONE]",
    "stall": "2 deltas (a stream) or nothing (a whole answer), then silence",
    "reset": "2 deltas (a stream) or half the body, then a TCP reset",
    "reset-early": "a TCP reset before any response byte",
    "reset-once": "a TCP reset before any response byte the first time the request id comes; "
                  "the answer when it comes again (a kept-alive connection the server closed "
                  "just as the client reused it)",
    "ignore-max-tokens": "50 tokens (streamed 1 per 100 ms) whatever max_tokens says",
    "refuse-max-tokens": "OpenAI's reasoning models: a body with `max_tokens` gets 400 "
                         "unsupported_parameter; one with `max_completion_tokens`, the answer",
    "context-length": "400 context_length_exceeded, as OpenAI answers a prompt too long",
    "context-size": "400 exceed_context_size_error, as llama-server answers a prompt too long",
}
#: Too long a prompt, as OpenAI and llama-server answer it.
CONTEXT_REFUSALS = {
    "context-length": dumps({"error": {
        "message": "This model's maximum context length is 8192 tokens. However, your messages "
                   "resulted in 9001 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}),
    "context-size": dumps({"error": {
        "code": 400, "message": "the request exceeds the available context size, try "
                                "increasing it", "type": "exceed_context_size_error",
        "n_prompt_tokens": 5144, "n_ctx": 4096}}),
}
#: A ``max_tokens`` key (inside a JSON string a quote is escaped, so this is a key or a value).
MAX_TOKENS_KEY = re.compile(rb'"max_tokens"\s*:')
#: OpenAI's answer to ``max_tokens`` on a reasoning model.
MAX_TOKENS_REFUSAL = dumps({"error": {
    "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
               "Use 'max_completion_tokens' instead.",
    "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}})
OVERRUN_TOKENS = 50
OVERRUN_DELAY_S = 0.1
FAULT_PREFIX = b"fault-"


def fault_name(request_id: bytes) -> str | None:
    """The fault a request id asks for, or None."""
    if not request_id.startswith(FAULT_PREFIX):
        return None
    name = request_id[len(FAULT_PREFIX):].split(b".")[0].decode("latin-1")
    return name if name in FAULTS else None


STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
INCLUDE_USAGE_TRUE = re.compile(rb'"include_usage"\s*:\s*true')
LOGPROBS_TRUE = re.compile(rb'"logprobs"\s*:\s*true')


def stream_mode(body: bytes) -> int:
    """PLAIN, STREAM or STREAM_WITH_USAGE, found by a byte search (no JSON parsing): inside
    a JSON string a quote is escaped, so ``"stream"`` can only be a key or a value."""
    if b'"stream"' not in body or not STREAM_TRUE.search(body):
        return PLAIN
    return STREAM_WITH_USAGE if INCLUDE_USAGE_TRUE.search(body) else STREAM


class Connection(asyncio.Protocol):
    """One client connection; httptools calls the ``on_*`` methods as it parses."""

    def __init__(self, answers: dict[str, object], options: Options, reset_once: set[bytes]):
        self.answers, self.options = answers, options
        #: The request ids the ``reset-once`` fault has reset (shared by the connections).
        self.reset_once = reset_once
        self.delay = options.delay_ms / 1000
        self.chunk_delay = options.stream_chunk_delay_ms / 1000
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url, self.body = b"", []
        self.request_id = b""
        self.tasks: list[asyncio.Task] = []  # answers still to come, oldest first

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        for task in self.tasks:
            task.cancel()

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.transport.close()
        except httptools.HttpParserError:
            self.send(response(b"400 Bad Request", error_body("malformed HTTP request",
                                                              "bad_request"), False), False)

    def on_message_begin(self):
        self.url, self.body, self.request_id = b"", [], b""

    def on_header(self, name: bytes, value: bytes):
        if len(name) == 12 and name.lower() == b"x-request-id":
            self.request_id = value

    def on_url(self, url: bytes):
        self.url += url

    def on_body(self, body: bytes):
        self.body.append(body)

    def on_message_complete(self):
        self.answer(self.parser.get_method(), self.url.partition(b"?")[0], b"".join(self.body),
                    self.parser.should_keep_alive())

    def answer(self, method: bytes, path: bytes, body: bytes, keep_alive: bool):
        route = ROUTES.get((method, path))
        chat = route == "chat"
        answer = self.answers.get("chat-logprobs" if chat and LOGPROBS_TRUE.search(body)
                                  else route)
        if isinstance(answer, Generation):
            if self.options.record is not None:
                with open(self.options.record, "ab") as f:
                    f.write(self.request_id + b"\n")
            mode = stream_mode(body)
            fault = fault_name(self.request_id) if self.request_id else None
            if fault == "reset-once":
                if self.request_id not in self.reset_once:
                    self.reset_once.add(self.request_id)
                    self.reset()
                    return
                fault = None
            if fault == "refuse-max-tokens" and MAX_TOKENS_KEY.search(body):
                data = response(b"400 Bad Request", MAX_TOKENS_REFUSAL, keep_alive)
            elif fault in CONTEXT_REFUSALS:
                data = response(b"400 Bad Request", CONTEXT_REFUSALS[fault], keep_alive)
            elif fault is not None and fault != "refuse-max-tokens":
                self.later(self.fault, fault, chat, mode, keep_alive)
                return
            elif self.delay or (mode and self.chunk_delay) or self.tasks:
                self.later(self.generate, answer, mode, keep_alive)
                return
            else:
                data = answer.whole[keep_alive, mode] if mode else answer.plain[keep_alive]
        elif answer is not None:
            data = answer[keep_alive]
        else:
            data = response(b"404 Not Found", error_body(
                f"no route for {method.decode('latin-1')} {path.decode('latin-1')}",
                "not_found"), keep_alive)
        if self.tasks:  # an earlier answer is still coming: keep pipelined answers in order
            self.later(self.send_async, data, keep_alive)
        else:
            self.send(data, keep_alive)

    def send(self, data: bytes, keep_alive: bool):
        if not self.transport.is_closing():
            self.transport.write(data)
            if not keep_alive:
                self.transport.close()

    def later(self, step, *args):
        """Run ``await step(*args)`` once every answer before it has been sent."""
        previous = self.tasks[-1] if self.tasks else None
        task = asyncio.ensure_future(self.after(previous, step, args))
        self.tasks.append(task)
        task.add_done_callback(self.tasks.remove)

    @staticmethod
    async def after(previous: asyncio.Task | None, step, args):
        if previous is not None:
            await asyncio.wait([previous])
        await step(*args)

    async def send_async(self, data: bytes, keep_alive: bool):
        self.send(data, keep_alive)

    async def generate(self, answer: Generation, mode: int, keep_alive: bool):
        if self.delay:
            await asyncio.sleep(self.delay)
        if not mode or not self.chunk_delay:
            self.send(answer.whole[keep_alive, mode] if mode else answer.plain[keep_alive],
                      keep_alive)
            return
        self.send(stream_head(keep_alive), True)
        for frame in answer.frames[mode]:
            await asyncio.sleep(self.chunk_delay)
            if self.transport.is_closing():
                return
            self.transport.write(frame)
        self.send(END_OF_CHUNKS, keep_alive)


    # -- faults -------------------------------------------------------------------------

    def reset(self):
        """Close the connection with a TCP reset (RST), not a FIN."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    async def fault(self, name: str, chat: bool, mode: int, keep_alive: bool):
        """Answer with the broken answer ``name`` (:data:`FAULTS`)."""
        if name == "reset-early":
            self.reset()
            return
        if mode:
            await self.fault_stream(name, chat, keep_alive)
        else:
            await self.fault_whole(name, chat, keep_alive)

    def fault_body(self, chat: bool, content, usage) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": content},
                   "finish_reason": "stop"} if chat
                  else {"index": 0, "text": content, "finish_reason": "stop"})
        return {"id": "fault", "object": "chat.completion" if chat else "text_completion",
                "created": CREATED, "model": self.options.model, "choices": [choice],
                "usage": usage}

    async def fault_whole(self, name: str, chat: bool, keep_alive: bool):
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": 14}
        if name == "stall":
            await asyncio.Event().wait()  # until the client gives up (connection_lost)
        body = {
            "usage-string": lambda: dumps(self.fault_body(chat, "hi", "14")),
            "data-int": lambda: b"123",
            "data-list": lambda: b"[1,2]",
            "content-int": lambda: dumps(self.fault_body(chat, 123, usage)),
            "ignore-max-tokens": lambda: dumps(self.fault_body(
                chat, "x" * OVERRUN_TOKENS,
                {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": OVERRUN_TOKENS,
                 "total_tokens": PROMPT_TOKENS + OVERRUN_TOKENS})),
        }.get(name, lambda: dumps(self.fault_body(chat, "hi", usage)))()
        if name in ("truncated", "reset"):
            whole = response(b"200 OK", body, False)
            self.transport.write(whole[:len(whole) - len(body) // 2])
            if name == "reset":
                self.reset()
            else:
                self.transport.close()
            return
        self.send(response(b"200 OK", body, keep_alive), keep_alive)

    def fault_chunk(self, chat: bool, **fields) -> dict:
        return {"id": "fault", "object": "chat.completion.chunk" if chat else "text_completion",
                "created": CREATED, "model": self.options.model, **fields}

    def fault_piece(self, chat: bool, content) -> bytes:
        choice = ({"index": 0, "delta": {"content": content}, "finish_reason": None} if chat
                  else {"index": 0, "text": content, "finish_reason": None})
        return sse(self.fault_chunk(chat, choices=[choice]))

    async def fault_stream(self, name: str, chat: bool, keep_alive: bool):
        if name == "not-sse":
            body = dumps(self.fault_body(chat, "hi", {"prompt_tokens": PROMPT_TOKENS,
                                                      "completion_tokens": 1,
                                                      "total_tokens": PROMPT_TOKENS + 1}))
            self.send(response(b"200 OK", body, keep_alive), keep_alive)
            return
        write = self.transport.write
        end_keep_alive = keep_alive and name not in ("truncated",)
        write(stream_head(end_keep_alive))
        write(self.fault_piece(chat, "Hello"))
        write(self.fault_piece(chat, " there"))
        finish = {"index": 0, "delta": {}, "finish_reason": "stop"} if chat else \
            {"index": 0, "text": "", "finish_reason": "stop"}
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": 14}
        if name == "usage-string":
            write(sse(self.fault_chunk(chat, choices=[finish])))
            write(sse(self.fault_chunk(chat, choices=[], usage="14")))
        elif name == "data-int":
            write(sse(b"123"))
        elif name == "data-list":
            write(sse(b"[1,2]"))
        elif name == "content-int":
            write(self.fault_piece(chat, 123))
        elif name == "truncated":
            self.send(END_OF_CHUNKS, False)
            return
        elif name == "stall":
            await asyncio.Event().wait()  # until the client gives up (connection_lost)
        elif name == "reset":
            await asyncio.sleep(0.05)  # let the deltas go out first
            self.reset()
            return
        elif name == "ignore-max-tokens":
            for i in range(OVERRUN_TOKENS - 2):
                await asyncio.sleep(OVERRUN_DELAY_S)
                if self.transport.is_closing():
                    return
                write(self.fault_piece(chat, f" t{i}"))
            write(sse(self.fault_chunk(chat, choices=[finish])))
            write(sse(self.fault_chunk(chat, choices=[], usage={
                "prompt_tokens": PROMPT_TOKENS, "completion_tokens": OVERRUN_TOKENS,
                "total_tokens": PROMPT_TOKENS + OVERRUN_TOKENS})))
        else:
            write(sse(self.fault_chunk(chat, choices=[finish])))
            write(sse(self.fault_chunk(chat, choices=[], usage=usage)))
        write(sse(b"[DONE]"))
        self.send(END_OF_CHUNKS, keep_alive)


async def start(options: Options, host: str = "127.0.0.1", port: int = 0,
                sock: socket.socket | None = None) -> asyncio.AbstractServer:
    """Serve on the running loop; the port is ``server.sockets[0].getsockname()[1]``."""
    answers = prepare(options)
    reset_once: set[bytes] = set()
    where = {"sock": sock} if sock is not None else {"host": host, "port": port}
    return await asyncio.get_running_loop().create_server(
        lambda: Connection(answers, options, reset_once), backlog=4096, **where)


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def serve_forever(sock: socket.socket, options: Options, parent: int | None = None) -> None:
    """Serve ``sock`` until SIGTERM or SIGINT (or, in a worker, until ``parent`` is gone)."""
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_parent():
        if os.getppid() != parent:
            stop.set()
        else:
            loop.call_later(1.0, watch_parent)

    if parent is not None:
        loop.call_later(1.0, watch_parent)
    server = loop.run_until_complete(start(options, sock=sock))
    loop.run_until_complete(stop.wait())
    server.close()
    loop.run_until_complete(server.wait_closed())
    loop.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): a free port")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    parser.add_argument("--model", default="fake-model", help="the model name in every answer")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="wait before answering a completion request")
    parser.add_argument("--stream-chunks", type=int, default=4, help="delta events per stream")
    parser.add_argument("--stream-chunk-delay-ms", type=float, default=0.0,
                        help="wait before each streamed event")
    parser.add_argument("--record", metavar="FILE",
                        help="append each completion request's X-Request-Id to FILE")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.stream_chunks < 1:
        parser.error("--workers and --stream-chunks must be at least 1")
    options = Options(args.model, args.delay_ms, args.stream_chunks, args.stream_chunk_delay_ms,
                      args.record)

    sock = listening_socket(args.host, args.port, reuse_port=args.workers > 1)
    port = sock.getsockname()[1]
    children = []
    listening, told = os.pipe()  # each worker writes a byte here once it listens
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            os.close(listening)
            os._exit(worker(sock, args.host, port, options, told))
        children.append(pid)
    os.close(told)
    started = 0
    while started < len(children):
        news = os.read(listening, len(children))
        if not news:  # every worker exited: the error is on stderr
            stop_workers(children)
            return 1
        started += len(news)
    os.close(listening)
    print(f"READY {port}", flush=True)
    try:
        serve_forever(sock, options)
    finally:
        stop_workers(children)
    return 0


def worker(inherited: socket.socket, host: str, port: int, options: Options, told: int) -> int:
    """A forked worker: its own socket on the same port (the kernel spreads connections
    across them); the exit status."""
    inherited.close()
    try:
        sock = listening_socket(host, port, True)
        os.write(told, b".")
        os.close(told)
        serve_forever(sock, options, os.getppid())
    except Exception:  # noqa: BLE001 - a forked worker reports any failure as its exit status
        traceback.print_exc()
        return 1
    return 0


def stop_workers(children: list[int]) -> None:
    for pid in children:
        try:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass

if __name__ == "__main__":
    sys.exit(main())
