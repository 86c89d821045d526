"""In-process llama.cpp through llama-cpp-python.

``slots`` llama.cpp contexts serve generations in parallel; each is driven by its own
worker thread so the event loop never blocks. A request waits for a free slot in a
bounded queue (``max_queue``) for at most ``queue_timeout_s``. The chat template is the
one the GGUF carries (llama-cpp-python reads ``tokenizer.chat_template``) unless the
policy names another.

Each generation gets a :class:`_TokenTap` that the model's token loop updates: it counts
prompt and completion tokens exactly (also for streams, where llama-cpp-python reports no
usage), and once the request is cancelled the loop stops, so a client that disconnects
frees its slot within one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import Field

from .base import (
    Backend,
    BackendFailure,
    BackendRejected,
    BackendUnavailable,
    Chunk,
    Generation,
    GenerationRequest,
    Health,
    Usage,
)
from .kind import BackendKind, Capabilities, Requirement, Settings
from .llamacpp_features import (
    LogprobRecorder,
    RequestPlan,
    StreamShaper,
    plan_request,
    shape_answer,
)
from .models import ModelError, resolve_model_path

# OpenAI's sampling defaults, used when the client gives none (llama-cpp-python's differ).
_DEFAULT_TEMPERATURE = 1.0
_DEFAULT_TOP_P = 1.0
_END = object()
#: llama.cpp's model loading is not thread-safe: two ``Llama(...)`` constructions in two
#: threads of one process deadlocked here (about 2 starts in 3, holding the GIL), so every
#: load in the process takes this lock. Generation on loaded models is unaffected.
_LOAD_LOCK = threading.Lock()
_LLAMA_CPP = Requirement("llama_cpp", "llama-cpp-python", "llamacpp")


class LlamaCppSettings(Settings):
    """In-process llama.cpp (llama-cpp-python) serving one GGUF model."""

    #: A catalog name (``joulegate models``) or a path to a ``.gguf`` file.
    model: str = Field(min_length=1)
    n_ctx: int = Field(4096, ge=128, le=1 << 20)
    #: CPU threads per slot; default: all cores.
    n_threads: int | None = Field(None, ge=1, le=1024)
    #: Parallel generations (one llama.cpp context each; the weights are shared through mmap).
    slots: int = Field(1, ge=1, le=64)
    #: Requests allowed to wait for a slot; beyond it the backend answers 503 at once.
    max_queue: int = Field(64, ge=0, le=100_000)
    #: Longest wait for a slot before the request fails with 503.
    queue_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Override the chat template the GGUF carries (a llama-cpp-python chat format name).
    chat_format: str | None = None


class _TokenTap:
    """A request's live token counts (its ``progress``) and cancellation flag, read and
    written by the model's token loop."""

    def __init__(self, progress: Usage) -> None:
        self.cancelled = threading.Event()
        self.progress = progress
        #: Set when the request asked for log-probabilities.
        self.recorder: LogprobRecorder | None = None

    def usage(self) -> Usage:
        return Usage(self.progress.prompt_tokens, self.progress.completion_tokens)


def _counting_llama(llama_cpp: Any) -> type:
    """A ``Llama`` whose ``generate`` (the loop every completion and chat call runs) counts
    tokens and stops early once the request is cancelled.

    Counting here is exact for streams too: the prompt is the token list llama.cpp
    evaluates, and a completion token is every generated token except the end-of-generation
    one, which is what llama-cpp-python's own non-streaming ``usage`` reports.
    """

    # llama_cpp arrives as a parameter (an optional extra, imported lazily), so its Llama is Any.
    class CountingLlama(llama_cpp.Llama):  # type: ignore[misc]
        tap: _TokenTap | None = None

        def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[int]:
            tap = self.tap
            inner = super().generate(tokens, *args, **kwargs)
            if tap is None:
                yield from inner
                return
            progress = tap.progress
            progress.prompt_tokens = len(tokens)
            vocab = self._model.vocab
            for token in inner:
                if tap.cancelled.is_set():
                    return
                if not llama_cpp.llama_vocab_is_eog(vocab, token):
                    progress.completion_tokens += 1
                    if tap.recorder is not None:
                        tap.recorder.record(token)
                yield token

    return CountingLlama


class LlamaCppBackend(Backend):
    kind = "llamacpp"

    def __init__(self, name: str, settings: LlamaCppSettings):
        super().__init__(name)
        self.model = settings.model
        self.n_ctx = settings.n_ctx
        self.n_threads = settings.n_threads or os.cpu_count() or 1
        self.slots = settings.slots
        self.max_queue = settings.max_queue
        self.queue_timeout_s = settings.queue_timeout_s
        self.chat_format = settings.chat_format
        self._free: list[Any] = []
        self._slot_sem: asyncio.Semaphore | None = None
        self._waiting = 0
        self._executor: ThreadPoolExecutor | None = None
        self._loaded = False
        self._error = ""
        #: Whether the chat template renders ``tools`` itself (Qwen2.5's GGUF template does);
        #: otherwise tools, calls and results are written into the messages as Hermes text.
        self._template_tools = False
        self._grammar_class: Any = None  # llama_cpp.LlamaGrammar, once loaded
        self._processors: Any = None  # llama_cpp.LogitsProcessorList

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise BackendUnavailable(f"{_LLAMA_CPP.package} is not installed: "
                                     f"{_LLAMA_CPP.install}") from None
        try:
            path = await asyncio.to_thread(resolve_model_path, self.model)
        except ModelError as exc:
            self._error = str(exc)
            raise
        self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix=f"llamacpp-{self.name}")

        llama_class = _counting_llama(llama_cpp)

        def load_slots() -> list[Any]:
            with _LOAD_LOCK:
                return [llama_class(model_path=str(path), n_ctx=self.n_ctx,
                                    n_threads=self.n_threads, n_threads_batch=self.n_threads,
                                    chat_format=self.chat_format, verbose=False)
                        for _ in range(self.slots)]

        self._free = await asyncio.to_thread(load_slots)
        template = self._free[0].metadata.get("tokenizer.chat_template") or ""
        self._template_tools = self.chat_format is None and "tools" in template
        self._grammar_class = importlib.import_module("llama_cpp.llama_grammar").LlamaGrammar
        self._processors = llama_cpp.LogitsProcessorList
        self._slot_sem = asyncio.Semaphore(self.slots)
        self._loaded = True

    async def close(self) -> None:
        self._loaded = False
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None
        for llm in self._free:
            with contextlib.suppress(Exception):
                llm.close()
        self._free = []

    # -- slots --------------------------------------------------------------------------

    async def _acquire(self) -> Any:
        if not self._loaded or self._slot_sem is None:
            raise BackendUnavailable(f"backend '{self.name}' is not loaded")
        sem = self._slot_sem
        if sem.locked() and self._waiting >= self.max_queue:
            raise BackendUnavailable(f"backend '{self.name}' is busy: {self._waiting} requests "
                                     "already queued", retry_after_s=self.queue_timeout_s)
        self._waiting += 1
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await sem.acquire()
        except TimeoutError:
            raise BackendUnavailable(f"backend '{self.name}' had no free slot within "
                                     f"{self.queue_timeout_s:g} s", retry_after_s=1.0) from None
        finally:
            self._waiting -= 1
        return self._free.pop()

    def _release(self, llm: Any) -> None:
        self._free.append(llm)
        assert self._slot_sem is not None
        self._slot_sem.release()

    def _submit(self, work: Callable[[Any], Any], llm: Any) -> asyncio.Future[Any]:
        """Run ``work(llm)`` on a worker thread; the slot returns when the thread is done,
        even if the awaiting task is cancelled first."""
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        future = self._executor.submit(work, llm)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release, llm))
        return asyncio.wrap_future(future, loop=loop)

    # -- generation ---------------------------------------------------------------------

    def _plan(self, req: GenerationRequest) -> RequestPlan:
        return plan_request(req, template_renders_tools=self._template_tools)

    def _call(self, llm: Any, req: GenerationRequest, plan: RequestPlan, tap: _TokenTap,
              stream: bool) -> Any:
        llm.tap = tap
        kwargs: dict[str, Any] = {
            "max_tokens": req.max_tokens,
            "temperature": _DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            "top_p": _DEFAULT_TOP_P if req.top_p is None else req.top_p,
            "stop": req.stop or [],
            "seed": req.seed,
            "stream": stream,
        }
        if plan.grammar is not None:
            kwargs["grammar"] = self._grammar_class.from_string(plan.grammar, verbose=False)
        if plan.top_logprobs is not None:
            tap.recorder = LogprobRecorder(plan.top_logprobs, llm.detokenize)
            kwargs["logits_processor"] = self._processors([tap.recorder.observe])
        try:
            if plan.messages is not None:
                return llm.create_chat_completion(messages=plan.messages,
                                                  tools=plan.template_tools, **kwargs)
            return llm.create_completion(prompt=req.prompt or "", **kwargs)
        except ValueError as exc:  # llama-cpp-python: prompt longer than the context window
            raise BackendRejected(str(exc), param="messages" if req.messages else "prompt") from None

    async def complete(self, request: GenerationRequest) -> Generation:
        plan = self._plan(request)
        llm = await self._acquire()
        tap = _TokenTap(request.progress)

        def work(llm: Any) -> Any:
            try:
                return self._call(llm, request, plan, tap, stream=False)
            finally:
                llm.tap = None

        try:
            out = await self._submit(work, llm)
        except asyncio.CancelledError:
            tap.cancelled.set()
            raise
        except (RuntimeError, OSError) as exc:
            raise BackendFailure(f"llama.cpp failed: {exc}") from None
        choice = out["choices"][0]
        text = choice["message"]["content"] if request.messages is not None else choice["text"]
        content, calls, finish = shape_answer(plan, text or "",
                                              choice.get("finish_reason") or "stop")
        return Generation(text=content, finish_reason=finish, usage=tap.usage(), tool_calls=calls,
                          logprobs=tap.recorder.all() if tap.recorder is not None else None)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        plan = self._plan(request)
        shaper = StreamShaper(plan)
        llm = await self._acquire()
        tap = _TokenTap(request.progress)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def work(llm: Any) -> None:
            try:
                for part in self._call(llm, request, plan, tap, stream=True):
                    # The tokens recorded so far are those whose text this part carries.
                    drained = tap.recorder.drain() if tap.recorder is not None else None
                    loop.call_soon_threadsafe(queue.put_nowait, (part, drained))
                    if tap.cancelled.is_set():
                        break
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                llm.tap = None
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        done = self._submit(work, llm)
        finish: str | None = None
        try:
            while (part := await queue.get()) is not _END:
                if isinstance(part, BackendRejected):
                    raise part
                if isinstance(part, BaseException):
                    raise BackendFailure(f"llama.cpp failed: {part}")
                part, drained = part
                choice = part["choices"][0]
                if request.messages is not None:
                    text = (choice.get("delta") or {}).get("content") or ""
                else:
                    text = choice.get("text") or ""
                finish = choice.get("finish_reason") or finish
                if text or drained:
                    for chunk in shaper.feed(text, drained):
                        yield chunk
            await done
            rest = tap.recorder.drain() if tap.recorder is not None else None
            chunks, final = shaper.finish(finish or "stop", rest)
            for chunk in chunks:
                yield chunk
            yield Chunk(finish_reason=final, usage=tap.usage())
        finally:
            tap.cancelled.set()  # no-op when finished; stops generation when abandoned

    async def health(self) -> Health:
        if not self._loaded:
            return Health(False, self._error or "model not loaded")
        busy = self.slots - len(self._free)
        return Health(True, "ok", {"slots": self.slots, "busy": busy, "queued": self._waiting})


KIND = BackendKind(LlamaCppBackend.kind, LlamaCppSettings,
                   Capabilities(streaming=True, tools=True, structured_output=True,
                                logprobs=True, local=True), LlamaCppBackend,
                   requirement=_LLAMA_CPP)
