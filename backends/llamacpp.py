"""In-process llama.cpp through llama-cpp-python: several sequences decoded in shared batches.

The model is loaded once. One llama.cpp context with one KV cache of ``n_ctx`` tokens per
slot, shared by all (llama.cpp's unified KV cache; each sequence is held to ``n_ctx``
tokens), serves up to ``slots`` generations at once, all decoded together by one
:class:`~backends.llamacpp_batch.BatchEngine` (continuous batching: every step decodes the
next token of every running sequence plus a chunk of any prompt still being read, in one
``llama_decode``; a new request joins at the next step). A request waits for a free slot in
a bounded queue (``max_queue``) for at most ``queue_timeout_s``. Each request runs
llama-cpp-python's own completion path (chat template, stop strings, streaming, grammar) on
a worker thread, through a per-request handle on the shared model whose ``generate`` takes
its tokens from the engine. The chat template is the one the GGUF carries
(llama-cpp-python reads ``tokenizer.chat_template``) unless the policy names another.

Why batched decode rather than one context per slot (option (a) of issue 17: contexts whose
threads together equal the cores). One ``llama_decode`` of k tokens reads the weights once
for all k, where k contexts each read them for their own token. Measured here
(``benchmarks/llamacpp_concurrency.py``; Qwen2.5-Coder-0.5B Q4_K_M, 2 cores, 1 decode
thread, ~110-token prompts, 128 output tokens; with other jobs using ~1.6 of the 2 cores,
so noisy, see ``benchmarks/results/llamacpp-concurrency-20261203-140831.md`` and
``-142623.md``): at concurrency 4 the batched engine ran 6.3 and 11.8 tok/s at 0.060 and
0.053 CPU-s/token against 5.7 and 9.7 tok/s at 0.065 and 0.062 for two 1-thread contexts,
with half the time to first token (17 s against 32 s, 8 s against 17 s p50: four
sequences run at once instead of two plus a queue); a bare decode step of 4 sequences
costs 2.6x the CPU of a step of one (1.55x less per token: this model's weights are mostly
Q5_0, whose CPU kernels gain little from a batch). At one sequence the two are within
noise of each other. So: one context, batched.

Threads follow llama.cpp's own rule: a step of one token (one sequence generating alone)
runs on ``n_threads`` (half the cores: cheapest per token), a step of several (a prompt, or
several sequences together) on ``n_threads_batch`` (every core), where the work splits
evenly. On a quiet box (``benchmarks/results/llamacpp-concurrency-*.md`` and
``llamacpp-anchor-*.md`` of 2026-12-03 after 16:25) that made 4 concurrent requests 1.6x
faster at the same CPU per token, level with ``llama-server`` run the same way.

Why one unified KV cache and not a KV stream per slot. With a stream per sequence, llama.cpp
splits a batch into micro-batches of sequences with *consecutive* ids only (its
``split_equal(sequential=true)``), and each micro-batch's attention spans every stream from
its lowest to its highest id. Slots are taken and freed in any order, so after a while the
running sequences sit in slots such as 0, 3 and 6: one step became several
``llama_decode`` graph runs, each reading all the weights. Measured here (0.5B, 2 cores,
``n_ctx`` 512, 8 slots, 4 or 8 requests of ~70 + 128 tokens per level, the backend driven
directly, levels run one after another in one process; two runs each, alternated): 2
concurrent requests after a level of 4 took 60-68 ms a step with streams and 47-52 ms
unified; 8 after levels of 1, 2, 4 and 2 ran 43 and 47 tok/s with streams, 68 and 68
unified; as a first level the two are level (c=8: 67/65 against 60/66 tok/s). The cost of
unified: a finished sequence's cells stay for prefix reuse, and every token's attention
walks all cells up to the highest one in use (flash attention skips the masked ones
cheaply): one sequence alone after 8 had run took 37-38 ms a step against 35.

A request may have its prompt's last tokens scored (``prompt_logprobs``: each one's
log-probability given the tokens before it, computed by the engine from the logits of the
prompt's own positions, as the prompt is read): a stream's first chunk carries them before any
text, a whole answer's :class:`Generation` too. The cascade's ``signal: prompt`` reads them.
The scores stay with the slot's cached tokens, so a prefix scored before (a system prompt, the
conversation so far) is not read again (:mod:`backends.llamacpp_batch`).

A plain completion with a ``suffix`` is filled in the middle: the prompt, the suffix and the
model's own fill-in-the-middle tokens (:func:`~backends.llamacpp_features.insertion_prompt`),
and the answer is what goes between. A model without such tokens refuses it (400, ``suffix``).

Each generation's token loop updates the request's ``progress`` exactly (prompt tokens,
and every generated token except the end-of-generation one, which is what
llama-cpp-python's own non-streaming ``usage`` reports), also for streams; a request
waiting for a slot has processed nothing, so energy attribution charges it nothing. Once
the request is cancelled its worker stops waiting within 50 ms (so a client that
disconnects frees its slot at once) and the engine drops the sequence at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
import os
import re
import threading
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from .base import (
    Backend,
    BackendFailure,
    BackendRejected,
    BackendUnavailable,
    Chunk,
    ContextWindowExceeded,
    Generation,
    GenerationRequest,
    Health,
    Usage,
    context_window_message,
)
from .features import TokenLogprob
from .kind import BackendKind, Capabilities, Requirement, Settings
from .llamacpp_batch import BatchEngine
from .llamacpp_features import (
    FimTokens,
    LogprobRecorder,
    RequestPlan,
    StreamShaper,
    insertion_prompt,
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
#: The context ``Llama`` itself makes is not used for generation (the engine has its own):
#: keep it small.
_HANDLE_N_CTX = 256
_HANDLE_N_BATCH = 16


class LlamaCppSettings(Settings):
    """In-process llama.cpp (llama-cpp-python) serving one GGUF model."""

    #: A catalog name (``joulegate models``) or a path to a ``.gguf`` file.
    model: str = Field(min_length=1)
    #: Context window of each generation (prompt + output), in tokens.
    n_ctx: int = Field(4096, ge=128, le=1 << 20)
    #: CPU threads for a step of one token (one sequence generating alone); default: half
    #: the cores (at least 1), as llama-cpp-python's own default. Measured on 2 cores: at one
    #: sequence 1 thread costs ~16-27% less CPU per token than 2, and when other work shares
    #: the cores, threads that wait on each other at every op spin away the CPU (2 threads
    #: were ~9x worse per token than 1 then).
    n_threads: int | None = Field(None, ge=1, le=1024)
    #: CPU threads for a step of several tokens: a prompt being read, or several sequences
    #: generating together (llama.cpp's own split: ``n_threads`` for one token, this for
    #: more); default: every core. Such steps have work enough to split evenly: measured here
    #: (0.5B, 2 cores) prompts read at 62 tok/s on 1 thread and 123 on 2, and 4 sequences of
    #: 128 tokens took 13.1 s on 2 threads against 20.8 s on 1 at 26.0 against 25.0 CPU-s.
    n_threads_batch: int | None = Field(None, ge=1, le=1024)
    #: Generations decoded together (one shared context and KV cache, ``n_ctx`` each).
    #: More slots cost KV memory only (``n_ctx`` tokens each); on a CPU, aggregate speed grows
    #: with them up to the point where the batch becomes compute-bound.
    slots: int = Field(4, ge=1, le=64)
    #: Most tokens in one decode step (prompt chunks and the running sequences' next tokens).
    n_batch: int = Field(512, ge=16, le=8192)
    #: Flash attention: ``auto`` (llama.cpp's own default, as ``llama-server`` runs: on
    #: where the device supports it, which a CPU does), ``on`` or ``off``. Measured here
    #: (0.5B, 2 cores, 8 requests of ~135 + 128 tokens, two A/B pairs through the gateway):
    #: ``auto`` against ``off`` 53.4/53.8 against 52.8/53.3 tok/s at concurrency 4 and
    #: 61.9/56.4 against 57.7/54.7 at 8; attention is a larger share of a step as the KV grows.
    #: With ``off``, every token's attention also computes over the cells that finished
    #: sequences leave cached for prefix reuse (the slots share one cache), which flash
    #: attention skips.
    flash_attn: Literal["auto", "on", "off"] = "auto"
    #: Requests allowed to wait for a slot; beyond it the backend answers 503 at once.
    max_queue: int = Field(64, ge=0, le=100_000)
    #: Longest wait for a slot before the request fails with 503.
    queue_timeout_s: float = Field(30.0, gt=0, le=3600)
    #: Override the chat template the GGUF carries (a llama-cpp-python chat format name).
    chat_format: str | None = None


class _TokenTap:
    """A request's live token counts (its ``progress``) and cancellation flag, read and
    written by the token loop."""

    def __init__(self, progress: Usage, score_last: int = 0) -> None:
        self.cancelled = threading.Event()
        self.progress = progress
        #: Set when the request asked for log-probabilities.
        self.recorder: LogprobRecorder | None = None
        #: The prompt's last tokens to score (``GenerationRequest.prompt_logprobs``), the
        #: scores once the prompt is read, and who hears of them then (a stream).
        self.score_last = score_last
        self.prompt_logprobs: list[TokenLogprob] | None = None
        self.on_prompt: Callable[[list[TokenLogprob]], None] | None = None

    def usage(self) -> Usage:
        return Usage(self.progress.prompt_tokens, self.progress.completion_tokens)


def _sequence_llama(llama_cpp: Any) -> type:
    """The class of a request's handle on the shared model: llama-cpp-python's ``Llama``
    (its whole completion path) whose ``generate`` runs on the :class:`BatchEngine`.

    A handle shares everything of the loaded ``Llama`` (model, tokenizer, chat handlers)
    but owns nothing: closing or dropping it frees nothing. Its ``generate`` counts tokens
    into the request's tap and stops early once the request is cancelled.
    """

    np = importlib.import_module("numpy")  # llama-cpp-python's own dependency
    # One class per backend, so per model: each token's bytes, filled as tokens are met
    # (a token's piece depends on the token alone: ``llama_token_to_piece``, no lstrip).
    _PIECES: dict[int, bytes] = {}
    _SPECIAL_PIECES: dict[int, bytes] = {}
    _BOS: list[int] = []

    def _piece(vocab: Any, token: int, special: bool) -> bytes:
        size = 32
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(token), buffer,
                                               size, 0, special)
            if n >= 0:
                return buffer.raw[:n]
            size = -n  # too small: llama.cpp says how much it needs

    # llama_cpp arrives as a parameter (an optional extra, imported lazily), so its Llama is Any.
    class SequenceLlama(llama_cpp.Llama):  # type: ignore[misc]
        def __init__(self, base: Any, engine: BatchEngine, n_ctx: int, tap: _TokenTap) -> None:
            # Not Llama.__init__: nothing is loaded, the base's state is shared.
            self.__dict__.update(base.__dict__)
            if not _BOS:
                _BOS.append(int(base._model.token_bos()))
            self._engine, self._n_ctx, self.tap = engine, n_ctx, tap
            # The penalties' window (llama.cpp's ``penalty_last_n``; the Llama's default is
            # 64): the whole sequence, so that ``frequency_penalty`` and ``presence_penalty``
            # count every token generated so far, as OpenAI's do. llama.cpp's sampler sees
            # only the tokens it sampled, never the prompt's.
            self.last_n_tokens_size = n_ctx
            #: The tokens evaluated so far (what ``Llama.generate`` keeps in ``input_ids``).
            self._history: list[int] = []
            self._zero_row: Any = None

        def close(self) -> None:
            """The model is the backend's to close, not a request's."""

        def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None,
                       special: bool = False) -> bytes:
            """``Llama.detokenize`` (its ``LlamaTokenizer``, which ignores ``prev_tokens``)
            from a table of each token's bytes instead of one ``llama_token_to_piece`` call
            per token. llama-cpp-python's streaming loop detokenizes every generated token
            so far for each new one, so a 128-token answer made ~8,000 such calls, each
            letting go of the GIL and taking it back, on the worker threads beside the
            batch engine."""
            pieces = _SPECIAL_PIECES if special else _PIECES
            try:
                text = b"".join([pieces[token] for token in tokens])
            except KeyError:
                for token in tokens:
                    if token not in pieces:
                        pieces[token] = _piece(self._model.vocab, token, special)
                text = b"".join([pieces[token] for token in tokens])
            # LlamaTokenizer's rule: a leading space after a beginning-of-sentence token goes.
            if tokens and tokens[0] == _BOS[0] and text[:1] == b" ":
                return text[1:]
            return text

        def __del__(self) -> None:
            pass

        def _scored(self, scores: list[tuple[int, float]]) -> list[TokenLogprob]:
            """The engine's prompt scores as tokens (special ones spelled out)."""
            out = []
            for token, logprob in scores:
                piece = self.detokenize([token], special=True)
                out.append(TokenLogprob(piece.decode("utf-8", errors="replace"), logprob,
                                        list(piece)))
            return out

        @property
        def _input_ids(self) -> Any:
            return np.asarray(self._history, dtype=np.intc)

        @property
        def _scores(self) -> Any:
            # Logits are sampled inside llama.cpp and not copied out; stopping criteria (the
            # chat handlers' stop-token check) get a zero row, as they only read the tokens.
            if self._zero_row is None:
                self._zero_row = np.zeros((1, self._n_vocab), dtype=np.single)
            return self._zero_row

        def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95,
                     min_p: float = 0.05, typical_p: float = 1.0, temp: float = 0.80,
                     repeat_penalty: float = 1.0, reset: bool = True,
                     frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                     tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_tau: float = 5.0,
                     mirostat_eta: float = 0.1, penalize_nl: bool = True,
                     logits_processor: Any = None, stopping_criteria: Any = None,
                     grammar: Any = None) -> Iterator[int]:
            """``Llama.generate``'s tokens, made by the shared engine: the same sampler
            chain (same order, same seed), the same stopping-criteria calls (on the tokens
            evaluated before the one just sampled)."""
            sampler = self._init_sampler(
                top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p, temp=temp,
                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                presence_penalty=presence_penalty, tfs_z=tfs_z, mirostat_mode=mirostat_mode,
                mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, penalize_nl=penalize_nl,
                logits_processor=logits_processor, grammar=grammar)
            tap: _TokenTap = self.tap
            seq = self._engine.submit(list(tokens), sampler, tap.cancelled, tap.score_last)
            progress = tap.progress
            progress.prompt_tokens = len(tokens)
            self._history = history = list(tokens)
            vocab = self._model.vocab
            with contextlib.closing(seq.tokens()) as made:
                for token in made:
                    if tap.cancelled.is_set():
                        return
                    if tap.score_last and tap.prompt_logprobs is None:  # the prompt is read
                        tap.prompt_logprobs = self._scored(seq.prompt_logprobs)
                        if tap.on_prompt is not None:
                            tap.on_prompt(tap.prompt_logprobs)
                    if stopping_criteria is not None and stopping_criteria(
                            self._input_ids, self._scores[-1, :]):
                        return
                    if not llama_cpp.llama_vocab_is_eog(vocab, token):
                        progress.completion_tokens += 1
                        if tap.recorder is not None:
                            # Before the next token is asked for, so before it is sampled.
                            tap.recorder.record(token)
                    yield token
                    history.append(token)

    return SequenceLlama


class LlamaCppBackend(Backend):
    kind = "llamacpp"

    def __init__(self, name: str, settings: LlamaCppSettings):
        super().__init__(name)
        self.model = settings.model
        self.n_ctx = settings.n_ctx
        self.n_threads = settings.n_threads or max(1, (os.cpu_count() or 1) // 2)
        self.n_threads_batch = settings.n_threads_batch or max(1, os.cpu_count() or 1)
        self.slots = settings.slots
        self.n_batch = settings.n_batch
        self.flash_attn = settings.flash_attn
        self.max_queue = settings.max_queue
        self.queue_timeout_s = settings.queue_timeout_s
        self.chat_format = settings.chat_format
        self._base: Any = None  # the loaded llama_cpp.Llama: model, tokenizer, chat handlers
        self._context: Any = None  # the engine's llama.cpp context (llama_cpp._internals)
        self._engine: BatchEngine | None = None
        self._handle_class: Any = None
        self._busy = 0
        self._slot_sem: asyncio.Semaphore | None = None
        self._waiting = 0
        self._executor: ThreadPoolExecutor | None = None
        self._loaded = False
        self._error = ""
        #: Whether the chat template renders ``tools`` itself (Qwen2.5's GGUF template does);
        #: otherwise tools, calls and results are written into the messages as Hermes text.
        self._template_tools = False
        self._grammar_class: Any = None  # llama_cpp.LlamaGrammar, once loaded
        self._fim: FimTokens = (-1, -1, -1)  # the model's fill-in-the-middle tokens
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
        internals = importlib.import_module("llama_cpp._internals")

        def load() -> tuple[Any, Any]:
            with _LOAD_LOCK:
                base = llama_cpp.Llama(model_path=str(path), n_ctx=_HANDLE_N_CTX,
                                       n_batch=_HANDLE_N_BATCH, n_threads=self.n_threads,
                                       n_threads_batch=self.n_threads_batch,
                                       chat_format=self.chat_format, verbose=False)
                try:
                    params = llama_cpp.llama_context_params.from_buffer_copy(base.context_params)
                    params.n_ctx = self.n_ctx * self.slots
                    params.n_batch = params.n_ubatch = self.n_batch
                    params.n_seq_max = self.slots
                    params.kv_unified = True  # one cache for all: see the module docstring
                    params.flash_attn_type = {
                        "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
                        "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                        "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED}[self.flash_attn]
                    params.n_threads, params.n_threads_batch = self.n_threads, self.n_threads_batch
                    context = internals.LlamaContext(model=base._model, params=params,
                                                     verbose=False)
                except BaseException:
                    base.close()
                    raise
                return base, context

        self._base, self._context = await asyncio.to_thread(load)
        vocab = self._base._model.vocab
        self._engine = BatchEngine(
            llama_cpp, self._context.ctx, n_seq=self.slots,
            n_ctx_seq=self.n_ctx, n_batch=self.n_batch,
            is_eog=lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token)),
            name=f"llamacpp-{self.name}", n_vocab=int(llama_cpp.llama_vocab_n_tokens(vocab)))
        self._executor = ThreadPoolExecutor(self.slots, thread_name_prefix=f"llamacpp-{self.name}")
        self._handle_class = _sequence_llama(llama_cpp)
        template = self._base.metadata.get("tokenizer.chat_template") or ""
        self._template_tools = self.chat_format is None and "tools" in template
        self._fim = (int(llama_cpp.llama_vocab_fim_pre(vocab)),
                     int(llama_cpp.llama_vocab_fim_suf(vocab)),
                     int(llama_cpp.llama_vocab_fim_mid(vocab)))
        self._grammar_class = importlib.import_module("llama_cpp.llama_grammar").LlamaGrammar
        self._processors = llama_cpp.LogitsProcessorList
        self._slot_sem = asyncio.Semaphore(self.slots)
        self._loaded = True

    async def close(self) -> None:
        self._loaded = False
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
            self._executor = None
        if self._engine is not None:
            await asyncio.to_thread(self._engine.close)
            self._engine = None
        for thing in (self._context, self._base):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.close()
        self._context = self._base = None

    # -- slots --------------------------------------------------------------------------

    async def _acquire(self) -> None:
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
        self._busy += 1

    def _release(self) -> None:
        self._busy -= 1
        assert self._slot_sem is not None
        self._slot_sem.release()

    def _submit(self, work: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``work`` on a worker thread; the slot returns when the thread is done, even
        if the awaiting task is cancelled first."""
        loop = asyncio.get_running_loop()
        assert self._executor is not None
        future = self._executor.submit(work)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
        return asyncio.wrap_future(future, loop=loop)

    def _handle(self, tap: _TokenTap) -> Any:
        """A request's handle on the shared model, generating through the engine."""
        return self._handle_class(self._base, self._engine, self.n_ctx, tap)

    # -- generation ---------------------------------------------------------------------

    def _plan(self, req: GenerationRequest) -> RequestPlan:
        return plan_request(req, template_renders_tools=self._template_tools, fim=self._fim)

    def _call(self, req: GenerationRequest, plan: RequestPlan, tap: _TokenTap,
              stream: bool) -> Any:
        llm = self._handle(tap)
        kwargs: dict[str, Any] = {
            "max_tokens": req.max_tokens,
            "temperature": _DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
            "top_p": _DEFAULT_TOP_P if req.top_p is None else req.top_p,
            "stop": req.stop or [],
            "seed": req.seed,
            "stream": stream,
            # OpenAI's penalties, over every token generated so far (the handle's window).
            "frequency_penalty": float(req.extra.get("frequency_penalty") or 0.0),
            "presence_penalty": float(req.extra.get("presence_penalty") or 0.0),
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
            if req.suffix is not None:
                # llama-cpp-python's own `suffix` writes token 0 for the FIM tokens (its
                # 0.3.x has them commented out), so the prompt goes as tokens. The client's
                # text is read with special=False: it cannot write a control token.
                def tokens(text: str) -> list[int]:
                    return list(llm.tokenize(text.encode(), add_bos=False, special=False))
                bos = llm.token_bos() if llm._model.add_bos_token() else None
                return llm.create_completion(prompt=insertion_prompt(
                    self._fim, tokens(req.prompt or ""), tokens(req.suffix), bos), **kwargs)
            return llm.create_completion(prompt=req.prompt or "", **kwargs)
        except ValueError as exc:  # llama-cpp-python: prompt longer than the context window
            raise self._rejected(exc, req) from None

    def _rejected(self, exc: ValueError, req: GenerationRequest) -> BackendRejected:
        param = "messages" if req.messages else "prompt"
        # llama-cpp-python: "Requested tokens (N) exceed context window of <its own n_ctx>";
        # a request's window is this backend's n_ctx.
        found = re.search(r"Requested tokens \((\d+)\) exceed context window", str(exc))
        if found:
            return ContextWindowExceeded(context_window_message(
                self.n_ctx, int(found.group(1)), req.messages is not None), param=param)
        return BackendRejected(str(exc), param=param)

    async def complete(self, request: GenerationRequest) -> Generation:
        plan = self._plan(request)
        await self._acquire()
        tap = _TokenTap(request.progress, request.prompt_logprobs)

        def work() -> Any:
            return self._call(request, plan, tap, stream=False)

        try:
            out = await self._submit(work)
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
                          logprobs=tap.recorder.all() if tap.recorder is not None else None,
                          prompt_logprobs=tap.prompt_logprobs)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        plan = self._plan(request)
        shaper = StreamShaper(plan)
        await self._acquire()
        tap = _TokenTap(request.progress, request.prompt_logprobs)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def on_prompt(scored: list[TokenLogprob]) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, Chunk(prompt_logprobs=scored))

        tap.on_prompt = on_prompt

        def work() -> None:
            try:
                parts = self._call(request, plan, tap, stream=True)
                with contextlib.closing(parts):
                    for part in parts:
                        # The tokens recorded so far are those whose text this part carries.
                        drained = tap.recorder.drain() if tap.recorder is not None else None
                        loop.call_soon_threadsafe(queue.put_nowait, (part, drained))
                        if tap.cancelled.is_set():
                            break
            except ValueError as exc:  # raised on the first part: the prompt does not fit
                loop.call_soon_threadsafe(queue.put_nowait, self._rejected(exc, request))
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        done = self._submit(work)
        finish: str | None = None
        try:
            while (part := await queue.get()) is not _END:
                if isinstance(part, BackendRejected):
                    raise part
                if isinstance(part, BaseException):
                    raise BackendFailure(f"llama.cpp failed: {part}")
                if isinstance(part, Chunk):  # the prompt's scores, before any text
                    yield part
                    continue
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
        return Health(True, "ok", {"slots": self.slots, "busy": self._busy,
                                   "queued": self._waiting})

    def context_window(self) -> int:
        return self.n_ctx


KIND = BackendKind(LlamaCppBackend.kind, LlamaCppSettings,
                   Capabilities(streaming=True, tools=True, structured_output=True,
                                logprobs=True, prompt_logprobs=True, insertion=True,
                                local=True),
                   LlamaCppBackend,
                   requirement=_LLAMA_CPP)
