"""Continuous batching for the in-process llama.cpp backend: one context, many sequences.

A :class:`BatchEngine` owns one llama.cpp context made for ``n_seq`` sequences (one
unified KV cache; the engine ends a sequence at ``n_ctx_seq`` tokens) and one thread that
drives it. A slot is a sequence id. Every step it
builds one ``llama_batch`` holding the next token of every sequence that is generating
and, in the room left (``n_batch``), the next chunk of the prompts that are still being
read, runs one ``llama_decode`` over all of it and samples each sequence's next token with
that sequence's own sampler chain (greedy, temperature, top-p, grammar, logits processors:
whatever :meth:`llama_cpp.Llama._init_sampler` built for the request). A new sequence
joins at the next step, a finished one leaves at the next step: continuous batching, as in
llama.cpp's own server.

Why one batch instead of one context per sequence: decoding on a CPU is bound by reading
the weights, and one ``llama_decode`` of k tokens reads them once, where k contexts each
read them for their own token on cores they fight over. Measured here (Qwen2.5-Coder-0.5B
Q4_K_M, 2 cores): see ``benchmarks/llamacpp_concurrency.py`` and the backend's docstring.

Tokens are made on demand: a sequence decodes its next token only once its consumer asked
for it (:meth:`Sequence.tokens` asks when it wants the next one), so a request that stops
(a stop sequence, ``max_tokens``, a client that left) costs no token beyond the last it
used. Before each step the engine waits a moment (``gather_s``, normally well under a
millisecond is needed) for the consumers of the previous step's tokens to ask again, so a
sequence does not miss a step because its consumer was a little slower than the engine.

A step of one token runs on the context's ``n_threads``, a step of more (a prompt chunk,
or several sequences generating) on its ``n_threads_batch``: llama.cpp's own rule.

A sequence that ends leaves its KV cells under its slot's id; the next sequence given that
slot keeps the longest common prefix with its own prompt and reads only the rest
(a repeated system prompt or conversation is not read again).

A sequence may also have its prompt's last tokens scored (``score_last``): those positions
ask for logits too, and each next prompt token's log-probability is kept
(:attr:`Sequence.prompt_logprobs`), for the cascade's prompt signal. The scores are kept
with the slot's cached tokens, and a scoring sequence also keeps the score of each token it
generates (0.15 ms of NumPy per token on a 152k vocabulary, against ~20 ms to make it): a
later prompt that shares a prefix with the slot's cells (the chat template's opening, a
system prompt, the conversation so far and its last answer) takes the shared tokens' scores
from the cache and reads only the rest, plus the one position that scores the first token
it adds. Scores end where the cache's do: after an unscored request, a scored one reads its
answer again. Among free slots a sequence takes the one whose cells it keeps the most of.

The engine knows nothing of requests, chat templates or stop strings: its unit is a token
list in and tokens out. Errors of ``llama_decode`` reach the consumers of the sequences in
that batch as :class:`RuntimeError`.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("joulegate.llamacpp")

#: What a sequence's queue carries when it has no more tokens.
_END = object()
#: How often a consumer waiting for a token looks whether its request was cancelled, and the
#: engine, when idle, whether a sequence was.
_POLL_S = 0.05


@dataclass(eq=False)
class Sequence:
    """One generation on the engine: its prompt, sampler, and the tokens going out."""

    prompt: list[int]
    #: A ``llama_cpp._internals.LlamaSampler``; the engine closes it when the sequence leaves.
    sampler: Any
    cancelled: threading.Event
    engine: BatchEngine
    out: queue.SimpleQueue[Any] = field(default_factory=queue.SimpleQueue)
    slot: int = -1
    #: Prompt tokens not yet decoded.
    pending: list[int] = field(default_factory=list)
    #: Tokens whose KV is in the cache under the slot's id (positions 0..len-1).
    in_kv: list[int] = field(default_factory=list)
    #: The last sampled token, to be decoded next (None: nothing sampled yet, or ended).
    last: int | None = None
    #: Tokens asked for by the consumer / sampled by the engine.
    wanted: int = 1
    made: int = 0
    ended: bool = False  # no more tokens will be made (end of generation, context full)
    released: bool = False  # the consumer is gone
    #: Score the prompt's last this-many tokens (0: none): each one's log-probability given
    #: the tokens before it goes to :attr:`prompt_logprobs`.
    score_last: int = 0
    #: ``(token, log-probability)`` of each scored prompt token, in prompt order; complete
    #: once the first generated token is out (the same step reads the prompt's end).
    prompt_logprobs: list[tuple[int, float]] = field(default_factory=list)
    #: Token index → its log-probability given the tokens before it, for the prompt's and
    #: (when scoring) the answer's tokens whose score is known (taken from the slot's cache,
    #: or computed here); kept with the slot's cells when the sequence leaves. It may hold
    #: the token after the last cell (sampled, never decoded): admission drops it.
    known: dict[int, float] = field(default_factory=dict)

    @property
    def score_from(self) -> int:
        """The first scored prompt token's index (the first token has no context: never)."""
        return max(1, len(self.prompt) - self.score_last) if self.score_last else len(self.prompt)

    def ready(self) -> bool:
        """Has a token to decode that its consumer wants."""
        return (not self.ended and not self.released and self.last is not None
                and self.wanted > self.made)

    def tokens(self) -> Generator[int, None, None]:
        """The sampled tokens, each made once the previous one was taken; ends at once
        when the request is cancelled (even while a step is running). Closing the iterator
        (or leaving a loop over it) releases the sequence."""
        try:
            while True:
                try:
                    item = self.out.get(timeout=_POLL_S)
                except queue.Empty:
                    if self.cancelled.is_set():  # leave now; the engine drops it next step
                        return
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                self.engine.want_next(self)
        finally:
            self.engine.release(self)


class BatchEngine:
    """One llama.cpp context serving up to ``n_seq`` sequences in shared batches."""

    def __init__(self, llama_cpp: Any, ctx: Any, *, n_seq: int, n_ctx_seq: int, n_batch: int,
                 is_eog: Callable[[int], bool], gather_s: float = 0.01, name: str = "llamacpp",
                 n_vocab: int = 0):
        self._ll = llama_cpp
        self._np = importlib.import_module("numpy")  # llama-cpp-python's own dependency
        self._ctx = ctx
        #: Logits per token (only scoring prompts reads them; 0: not known, none scored).
        self.n_vocab = n_vocab
        self._mem = llama_cpp.llama_get_memory(ctx)
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = n_batch
        self._is_eog = is_eog
        self.gather_s = gather_s
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._cond = threading.Condition()
        self._incoming: list[Sequence] = []
        self._active: list[Sequence] = []
        #: Per slot (sequence id): the tokens its cells hold, for prefix reuse, and the
        #: scores known of them (:attr:`Sequence.known`).
        self._cached: list[list[int]] = [[] for _ in range(n_seq)]
        self._scores: list[dict[int, float]] = [{} for _ in range(n_seq)]
        self._free_slots = list(range(n_seq))
        self._closed = False
        #: Steps run and tokens decoded (prompt + generated), for tests and benchmarks.
        self.steps = 0
        self.decoded = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-batch", daemon=True)
        self._thread.start()

    # -- consumer side (any thread) -----------------------------------------------------

    def submit(self, prompt: list[int], sampler: Any, cancelled: threading.Event,
               score_last: int = 0) -> Sequence:
        """Start a sequence; its first token is wanted at once. At most ``n_seq`` may be
        live (the backend's slots see to that). With ``score_last``, the prompt's last
        tokens are scored as they are read (:attr:`Sequence.prompt_logprobs`)."""
        if not prompt:
            sampler.close()
            raise ValueError("the prompt is empty: nothing to generate from")
        seq = Sequence(list(prompt), sampler, cancelled, self, score_last=max(0, score_last))
        with self._cond:
            if self._closed:
                sampler.close()
                raise RuntimeError("the model is closed")
            self._incoming.append(seq)
            self._cond.notify_all()
        return seq

    def want_next(self, seq: Sequence) -> None:
        with self._cond:
            seq.wanted += 1
            self._cond.notify_all()

    def release(self, seq: Sequence) -> None:
        with self._cond:
            seq.released = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the engine; sequences still live end with an error. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        for seq in self._incoming + self._active:
            seq.out.put(RuntimeError("the model was closed during generation"))
            seq.sampler.close()
        self._incoming, self._active = [], []
        self._ll.llama_batch_free(self._batch)

    # -- engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            plan: list[tuple[Sequence, list[int], bool]] | None = []
            try:
                with self._cond:
                    plan = self._next_plan()
                    if plan is None:
                        return
                if plan:
                    self._step(plan)
            except Exception as exc:  # the engine must outlive one bad step
                log.exception("llama.cpp batch engine: a step failed")
                self._fail(plan or [], RuntimeError(f"llama.cpp batch step failed: {exc}"))

    def _has_work(self) -> bool:
        return self._closed or bool(self._incoming) or any(
            s.released or s.cancelled.is_set() or s.pending or s.ready() for s in self._active)

    def _next_plan(self) -> list[tuple[Sequence, list[int], bool]] | None:
        """(Under the lock.) Wait for work, retire and admit sequences, gather the wanted
        tokens; the batch plan: (sequence, tokens, whether its last one needs logits)."""
        # A cancelled request sets its event without telling us: look again now and then.
        while not self._has_work():
            self._cond.wait(_POLL_S)
        if self._closed:
            return None
        # Give the consumers of the last step's tokens a moment to ask for the next ones.
        deadline = time.monotonic() + self.gather_s
        while (not self._closed
               and any(self._late(s) for s in self._active)
               and (left := deadline - time.monotonic()) > 0):
            self._cond.wait(left)
        if self._closed:
            return None
        self._retire()
        self._admit()
        plan: list[tuple[Sequence, list[int], bool]] = []
        room = self.n_batch
        for seq in self._active:  # generating sequences first: one token each
            if seq.ready() and room > 0:
                assert seq.last is not None
                plan.append((seq, [seq.last], True))
                room -= 1
        for seq in self._active:  # then prompts, in chunks, in arrival order
            if seq.pending and room > 0:
                chunk = seq.pending[:room]
                plan.append((seq, chunk, len(chunk) == len(seq.pending)))
                room -= len(chunk)
        return plan

    @staticmethod
    def _late(seq: Sequence) -> bool:
        """A generating sequence whose consumer has not yet asked for its next token."""
        return (not seq.ended and not seq.released and not seq.cancelled.is_set()
                and seq.last is not None and seq.wanted <= seq.made)

    def _retire(self) -> None:
        keep: list[Sequence] = []
        for seq in self._active:
            if seq.released or seq.cancelled.is_set():
                self._cached[seq.slot] = seq.in_kv
                self._scores[seq.slot] = seq.known
                self._free_slots.append(seq.slot)
                seq.sampler.close()
                seq.out.put(_END)  # a consumer still waiting (a cancelled one) stops
            else:
                keep.append(seq)
        self._active = keep

    def _admit(self) -> None:
        while self._incoming and self._free_slots:
            seq = self._incoming.pop(0)
            # The free slot whose cells the sequence can keep the most of; of those, the one
            # holding the fewest (a cache another prompt may still want is kept longest).
            (keep, shared), slot = max(((self._reusable(s, seq), s) for s in self._free_slots),
                                       key=lambda c: (c[0][0], -len(self._cached[c[1]])))
            self._free_slots.remove(slot)
            # A cached token's score holds while every token up to it is the same.
            seq.known = {j: lp for j, lp in self._scores[slot].items() if j < shared}
            if not self._ll.llama_memory_seq_rm(self._mem, slot, keep, -1):
                self._ll.llama_memory_seq_rm(self._mem, slot, -1, -1)
                keep = 0
            seq.slot, seq.in_kv, seq.pending = slot, seq.prompt[:keep], seq.prompt[keep:]
            # The scores of the kept tokens come from the cache; reading resumes at position
            # `keep`, whose logits score token keep + 1 onwards.
            seq.prompt_logprobs = [(seq.prompt[j], seq.known[j])
                                   for j in range(seq.score_from, keep + 1)]
            self._cached[slot], self._scores[slot] = [], {}
            self._active.append(seq)

    def _reusable(self, slot: int, seq: Sequence) -> tuple[int, int]:
        """(cells of ``slot`` the sequence keeps, tokens its prompt shares with them). The
        shared cells, but never the prompt's last token, whose logits give the first answer
        token; when the sequence scores its prompt, only as far as the slot's scores of the
        shared tokens go, less one (the position before the first token still to score)."""
        shared = _common_prefix(self._cached[slot], seq.prompt)
        keep = min(shared, len(seq.prompt) - 1)
        if seq.score_last:
            scores, j = self._scores[slot], seq.score_from
            while j < shared and j in scores:
                j += 1
            keep = min(keep, j - 1)
        return keep, shared

    def _step(self, plan: list[tuple[Sequence, list[int], bool]]) -> None:
        ll, batch = self._ll, self._batch
        n = 0
        outputs: list[tuple[Sequence, int]] = []
        scored: list[tuple[Sequence, int, int]] = []  # (sequence, batch index, token index)
        for seq, tokens, logits in plan:
            pos = len(seq.in_kv)
            # A prompt chunk's positions whose next prompt token is scored.
            first = seq.score_from - 1 if seq.pending else len(seq.prompt)
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n] = token, pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq.slot
                score = first <= pos + i < len(seq.prompt) - 1
                batch.logits[n] = (logits and i == len(tokens) - 1) or score
                if score:
                    scored.append((seq, n, pos + i + 1))
                n += 1
            if logits:
                outputs.append((seq, n - 1))
        batch.n_tokens = n
        rc = ll.llama_decode(self._ctx, batch)  # ctypes lets go of the GIL meanwhile
        self.steps += 1
        if rc != 0:
            self._fail(plan, RuntimeError(f"llama_decode failed (code {rc})"))
            return
        self.decoded += n
        for seq, index, j in scored:
            logprob = seq.known[j] = self._logprob(index, seq.prompt[j])
            seq.prompt_logprobs.append((seq.prompt[j], logprob))
        for seq, tokens, _ in plan:
            seq.in_kv.extend(tokens)
            if seq.pending:
                del seq.pending[:len(tokens)]
            else:
                seq.last = None  # decoded; the next one comes from sampling
        for seq, index in outputs:
            token = int(ll.llama_sampler_sample(seq.sampler.sampler, self._ctx, index))
            if seq.score_last:  # the next turn's prompt may repeat the answer: score it too
                seq.known[len(seq.in_kv)] = self._logprob(index, token)
            seq.made += 1
            seq.last = token
            if self._is_eog(token) or len(seq.in_kv) >= self.n_ctx_seq:
                seq.ended = True
            seq.out.put(token)
            if seq.ended:
                seq.out.put(_END)  # nothing follows an end of generation or a full context

    def _logprob(self, index: int, token: int) -> float:
        """``token``'s log-probability by the logits of the batch's ``index``-th token."""
        row = self._np.ctypeslib.as_array(self._ll.llama_get_logits_ith(self._ctx, index),
                                          shape=(self.n_vocab,))
        top = float(row.max())
        return float(row[token]) - top - float(self._np.log(self._np.exp(row - top).sum()))

    def _fail(self, plan: list[tuple[Sequence, list[int], bool]], error: Exception) -> None:
        with self._cond:
            for seq, _, _ in plan:
                if seq in self._active:
                    self._active.remove(seq)
                    self._ll.llama_memory_seq_rm(self._mem, seq.slot, -1, -1)
                    self._cached[seq.slot], self._scores[seq.slot] = [], {}
                    self._free_slots.append(seq.slot)
                    seq.sampler.close()
                    seq.out.put(error)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
