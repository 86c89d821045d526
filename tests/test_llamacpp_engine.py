"""The batch engine's bookkeeping of cells and prompt scores, over a stand-in for the
llama.cpp library (the hardware boundary: no model). The stand-in keeps every slot's cells
and gives each position logits that are a fixed function of the tokens up to it, so any
score the engine reports, cached or read, can be checked against a cold computation, and
every position it decodes is counted.

The real model runs the same paths in tests/test_llamacpp_backend.py (e2e)."""

from __future__ import annotations

import ctypes
import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from backends.llamacpp_batch import BatchEngine

pytestmark = pytest.mark.unit

VOCAB = 12
EOG = 0  # never sampled by the stand-in: answers end when their consumer stops


def logits(context: tuple[int, ...]) -> np.ndarray:
    """The stand-in model: logits after ``context``, the same whenever it is the same."""
    rng = random.Random(repr(context))
    return np.array([rng.uniform(-4, 4) for _ in range(VOCAB)], dtype=np.float32)


def truth(context: list[int], token: int) -> float:
    """``token``'s log-probability after ``context``, computed cold."""
    row = logits(tuple(context)).astype(np.float64)
    return float(row[token] - row.max() - np.log(np.exp(row - row.max()).sum()))


class FakeLlama:
    """The few llama.cpp calls the engine makes, over per-slot cell lists."""

    def __init__(self, n_seq: int):
        self.cells: list[list[int]] = [[] for _ in range(n_seq)]
        self.rows: dict[int, ctypes.Array] = {}  # batch index -> logits, last decode

    def llama_get_memory(self, ctx):
        return None

    def llama_batch_init(self, n_batch, embd, n_seq_max):
        return SimpleNamespace(token=[0] * n_batch, pos=[0] * n_batch, n_seq_id=[0] * n_batch,
                               seq_id=[[0] for _ in range(n_batch)], logits=[False] * n_batch,
                               n_tokens=0)

    def llama_batch_free(self, batch):
        pass

    def llama_memory_seq_rm(self, mem, slot, p0, p1):
        self.cells[slot] = [] if p0 < 0 else self.cells[slot][:p0]
        return True

    def llama_decode(self, ctx, batch):
        self.rows = {}
        for n in range(batch.n_tokens):
            slot = batch.seq_id[n][0]
            assert batch.pos[n] == len(self.cells[slot]), "a position out of order"
            self.cells[slot].append(batch.token[n])
            if batch.logits[n]:
                self.rows[n] = (ctypes.c_float * VOCAB)(*logits(tuple(self.cells[slot])))
        return 0

    def llama_get_logits_ith(self, ctx, index):
        return ctypes.cast(self.rows[index], ctypes.POINTER(ctypes.c_float))

    def llama_sampler_sample(self, sampler, ctx, index):
        row = list(self.rows[index])
        return max(range(1, VOCAB), key=lambda t: row[t])  # greedy, never EOG


class Sampler:
    sampler = None

    def close(self) -> None:
        pass


@pytest.fixture
def engine():
    made: list[BatchEngine] = []

    def make(n_seq: int = 1, n_batch: int = 64) -> tuple[BatchEngine, FakeLlama]:
        ll = FakeLlama(n_seq)
        eng = BatchEngine(ll, None, n_seq=n_seq, n_ctx_seq=10_000, n_batch=n_batch,
                          is_eog=lambda t: t == EOG, gather_s=0.0, n_vocab=VOCAB)
        made.append(eng)
        return eng, ll

    yield make
    for eng in made:
        eng.close()


def run(eng: BatchEngine, prompt: list[int], score_last: int = 0, answer: int = 1
        ) -> tuple[list[tuple[int, float]], list[int], int]:
    """One request: its prompt scores, the ``answer`` tokens it took, the positions decoded."""
    before = eng.decoded
    seq = eng.submit(prompt, Sampler(), threading.Event(), score_last)
    tokens = seq.tokens()
    taken = [next(tokens) for _ in range(answer)]
    tokens.close()  # the consumer leaves: the slot keeps its cells
    return seq.prompt_logprobs, taken, eng.decoded - before


def cold(prompt: list[int], score_last: int) -> list[tuple[int, float]]:
    start = max(1, len(prompt) - score_last) if score_last else len(prompt)
    return [(prompt[j], truth(prompt[:j], prompt[j])) for j in range(start, len(prompt))]


def same_scores(got: list[tuple[int, float]], want: list[tuple[int, float]]) -> bool:
    """The same tokens, and the same scores up to float32 rounding (a score after another
    context differs by a nat or so)."""
    return ([t for t, _ in got] == [t for t, _ in want]
            and [lp for _, lp in got] == pytest.approx([lp for _, lp in want], abs=1e-5))


def test_scores_are_a_cold_reads_whatever_the_slots_hold(engine):
    """Prompts that share prefixes of every length with what the slots hold, scored over
    windows shorter and longer than the prompt, read in chunks: every score is the cold one,
    in prompt order, none missing, none twice."""
    eng, _ = engine(n_seq=2, n_batch=5)
    rng = random.Random(7)
    base = [rng.randrange(1, VOCAB) for _ in range(30)]
    saved = 0
    for _ in range(150):
        shared = base[: rng.randrange(0, 30)]
        prompt = shared + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))]
        score_last = rng.choice([0, 1, 3, 8, 100])
        scores, _, decoded = run(eng, prompt, score_last, answer=rng.randrange(1, 4))
        assert same_scores(scores, cold(prompt, score_last))
        saved += len(prompt) - decoded
    assert saved > 0  # cached cells were kept, scored ones among them


def test_a_scored_prefix_is_not_read_again(engine):
    eng, _ = engine()
    system = list(range(1, 11)) * 3
    first, _, decoded = run(eng, [*system, 4, 5, 6], score_last=512)
    assert decoded == 33 and same_scores(first, cold([*system, 4, 5, 6], 512))
    second = [*system, 7, 8]
    scores, _, decoded = run(eng, second, score_last=512)
    # The 30 shared tokens keep their cells and their scores; the last of them is read again
    # for the logits that score token 30.
    assert decoded == len(second) - 29
    assert same_scores(scores, cold(second, 512))


def test_a_conversation_reads_only_its_new_turn(engine):
    """A scoring sequence keeps its answer's scores too: the next turn, which repeats the
    conversation and the answer, reads only what it adds."""
    eng, _ = engine()
    turn = [3, 1, 4, 1, 5, 9, 2, 6]
    _, answer, _ = run(eng, turn, score_last=512, answer=5)
    # Four answer tokens were decoded (the fifth was sampled, never decoded).
    conversation = [*turn, *answer, 7, 7, 2]
    scores, _, decoded = run(eng, conversation, score_last=512)
    shared = len(turn) + 4
    assert decoded == len(conversation) - (shared - 1)
    assert same_scores(scores, cold(conversation, 512))


def test_after_an_unscored_answer_the_answer_is_read_again(engine):
    eng, _ = engine()
    turn = [3, 1, 4, 1, 5, 9, 2, 6]
    run(eng, turn, score_last=512)
    _, answer, _ = run(eng, turn, score_last=0, answer=5)  # the same turn, unscored
    conversation = [*turn, *answer, 7, 7, 2]
    scores, _, decoded = run(eng, conversation, score_last=512)
    # The turn's scores survive the unscored request; its answer has none.
    assert decoded == len(conversation) - (len(turn) - 1)
    assert same_scores(scores, cold(conversation, 512))


def test_a_scoring_request_takes_the_slot_whose_scores_it_can_use(engine):
    """Of two free slots, the one sharing more tokens holds no scores for them: a scoring
    request keeps more cells in the other. An unscored one takes the longer match."""
    eng, _ = engine(n_seq=2)
    system = list(range(1, 11)) * 2
    # Both at once: slot 0 scores `system + [1]`, slot 1 reads `system + [2, 3, 4]` unscored.
    a = eng.submit([*system, 1], Sampler(), threading.Event(), 512)
    b = eng.submit([*system, 2, 3, 4], Sampler(), threading.Event(), 0)
    for seq in (a, b):
        tokens = seq.tokens()
        next(tokens)
        tokens.close()
    scored = [*system, 2, 3, 9]
    scores, _, decoded = run(eng, scored, score_last=512)
    assert decoded == len(scored) - (len(system) - 1)  # slot 0: the system's scores
    assert same_scores(scores, cold(scored, 512))
    _, _, decoded = run(eng, [*system, 2, 3, 4, 5], score_last=0)
    assert decoded == 1  # slot 1: every cell of `system + [2, 3, 4]` kept; 5 is read


def test_a_request_with_nothing_to_reuse_takes_the_emptiest_slot(engine):
    """A prompt that shares nothing with any slot leaves the cached ones alone: the next
    prompt that shares a cached prefix still finds it."""
    eng, _ = engine(n_seq=2)
    system = list(range(1, 11)) * 2
    run(eng, [*system, 1], score_last=512)  # slot 0 (both empty: the first free)
    run(eng, [5, 5, 5], score_last=512)  # slot 1; slot 0 is now first on the free list
    run(eng, [11, 11, 11], score_last=512)  # shares nothing: slot 1, which holds less
    scores, _, decoded = run(eng, [*system, 2], score_last=512)
    assert decoded == 2  # slot 0's system prompt and its scores were still there
    assert same_scores(scores, cold([*system, 2], 512))
