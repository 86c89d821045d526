"""The llama.cpp backend in-process with the real Qwen 0.5B: slots, queue, cancellation."""

from __future__ import annotations

import asyncio
import ctypes

import pytest

from backends import (
    BackendUnavailable,
    ContextWindowExceeded,
    GenerationRequest,
)
from backends.llamacpp import LlamaCppBackend, LlamaCppSettings
from gateway.routing.estimators import prompt_confidence

from .conftest import SMALL_MODEL

pytestmark = pytest.mark.e2e

def LONG() -> GenerationRequest:  # a request object per generation: it carries its progress
    return GenerationRequest(model="m", messages=[{"role": "user", "content": "Count to 500."}],
                             max_tokens=1000, temperature=0)


def SHORT() -> GenerationRequest:
    return GenerationRequest(model="m", prompt="def f():", max_tokens=2, temperature=0)


async def _with_backend(body, **settings):
    backend = LlamaCppBackend("q", LlamaCppSettings(model=SMALL_MODEL, n_ctx=1024, n_threads=2,
                                                    slots=1, **settings))
    await backend.start()
    try:
        await body(backend)
    finally:
        await backend.close()


async def _hold_slot(backend):
    """Start a long stream and return it once it produced its first token."""
    stream = backend.stream(LONG())
    first = await anext(stream)
    assert first.text
    return stream


def test_queue_timeout_and_full_queue(small_model_path):
    async def body(backend):
        stream = await _hold_slot(backend)
        with pytest.raises(BackendUnavailable, match=r"no free slot within 0\.3 s") as info:
            await backend.complete(SHORT())
        assert info.value.retry_after_s is not None
        waiter = asyncio.create_task(backend.complete(SHORT()))  # takes the single queue place
        await asyncio.sleep(0.05)
        assert (await backend.health()).info["queued"] == 1
        with pytest.raises(BackendUnavailable, match="1 requests already queued"):
            await backend.complete(SHORT())
        await stream.aclose()  # cancelling the stream frees the slot for the waiter
        result = await waiter
        assert result.usage.completion_tokens == 2
        health = await backend.health()
        assert health.info == {"slots": 1, "busy": 0, "queued": 0}

    asyncio.run(_with_backend(body, max_queue=1, queue_timeout_s=0.3))


def test_cancelled_request_frees_its_slot(small_model_path):
    async def body(backend):
        long = LONG()
        task = asyncio.create_task(backend.complete(long))
        for _ in range(1200):  # until it has produced a token (bounded; slow on a busy box)
            if long.progress.completion_tokens >= 1:
                break
            await asyncio.sleep(0.1)
        assert (await backend.health()).info["busy"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        result = await asyncio.wait_for(backend.complete(SHORT()), timeout=30)
        assert result.usage.completion_tokens == 2
        # generation stopped at the cancel: far below the 1000 tokens it asked for
        assert 1 <= long.progress.completion_tokens < 200

    asyncio.run(_with_backend(body, queue_timeout_s=60))


def test_prompt_over_context_is_rejected(small_model_path):
    async def body(backend):
        with pytest.raises(ContextWindowExceeded,
                           match=r"maximum context length is 1024 tokens\. However, your prompt "
                                 r"resulted in 150\d tokens") as refused:
            await backend.complete(GenerationRequest(model="m", prompt="7" * 1500, max_tokens=2))
        assert refused.value.param == "prompt"
        assert (await backend.health()).info["busy"] == 0

    asyncio.run(_with_backend(body))


def test_a_handle_detokenizes_as_llama_cpp_pieces_a_token_longer_than_32_bytes_too(
        small_model_path):
    """The handle's table of token bytes gives llama.cpp's own pieces (llama-cpp-python's
    loop, one ``llama_token_to_piece`` per token, is the reference), with its rule for a
    leading beginning-of-sentence token, and keeps the tokens longer than llama-cpp-python's
    32-byte buffer, whose bytes its own ``detokenize`` silently drops."""
    import random

    import llama_cpp

    from backends.llamacpp import _sequence_llama

    base = llama_cpp.Llama(model_path=str(small_model_path), vocab_only=True, verbose=False)
    handle = _sequence_llama(llama_cpp)(base, None, 256, None)
    vocab, buffer = base._model.vocab, ctypes.create_string_buffer(256)

    def piece(token: int, special: bool) -> bytes:  # llama.cpp's answer, with room enough
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, 256, 0, special)
        return buffer.raw[:n]

    rnd = random.Random(7)
    n_vocab = base.n_vocab()
    long_tokens = [t for t in range(n_vocab) if len(piece(t, False)) > 32]
    assert long_tokens  # Qwen2.5's vocabulary has some (runs of '/', '=', '-', ...)
    for trial in range(300):
        tokens = [rnd.randrange(n_vocab) for _ in range(rnd.randrange(0, 80))]
        if trial % 4 == 0:
            tokens = [base.token_bos(), *tokens]
        for special in (False, True):
            expected = b"".join(piece(t, special) for t in tokens)
            if tokens and tokens[0] == base.token_bos() and expected[:1] == b" ":
                expected = expected[1:]
            assert handle.detokenize(tokens, special=special) == expected
            if not any(t in long_tokens for t in tokens):
                assert handle.detokenize(tokens, special=special) == base.detokenize(
                    tokens, special=special)
    text = "def parse(x):\n    return [int(v) for v in x.split(',')]  # 你好 ünïcode"
    tokens = base.tokenize(text.encode(), add_bos=False)
    assert handle.detokenize(tokens, prev_tokens=[1, 2]).decode() == text
    long_token = long_tokens[0]
    assert handle.detokenize([long_token]) == piece(long_token, False)
    assert base.detokenize([long_token]) == b""  # llama-cpp-python's loss, mended here


def test_the_prompt_is_scored_as_it_is_read(small_model_path):
    """``prompt_logprobs``: a stream's first chunk, before any text, carries the prompt's last
    tokens with their log-probabilities under the model; a prompt the model knows scores
    higher than the same words shuffled; a repeated prompt (its prefix cached in the slot)
    is scored alike."""
    text = "The quick brown fox jumps over the lazy dog."
    shuffled = "Dog the over quick lazy jumps fox the brown."

    async def scores(backend, content: str) -> tuple[list, str]:
        req = GenerationRequest(model="m", messages=[{"role": "user", "content": content}],
                                max_tokens=4, temperature=0, prompt_logprobs=20)
        chunks = [c async for c in backend.stream(req)]
        first = chunks[0]
        assert first.prompt_logprobs is not None and first.text == "" and first.usage is None
        assert all(c.prompt_logprobs is None for c in chunks[1:])
        assert "".join(c.text for c in chunks) != ""  # the answer follows
        return first.prompt_logprobs, "".join(t.token for t in first.prompt_logprobs)

    async def body(backend):
        scored, spelled = await scores(backend, text)
        assert len(scored) == 20
        # The prompt's end: the user's words, then the template's close and the reply's start.
        assert "lazy dog." in spelled and spelled.endswith("<|im_start|>assistant\n")
        assert all(t.logprob <= 0 for t in scored)
        again, _ = await scores(backend, text)
        assert [t.token for t in again] == [t.token for t in scored]
        assert [t.logprob for t in again] == pytest.approx([t.logprob for t in scored], abs=0.3)
        odd, _ = await scores(backend, shuffled)
        assert prompt_confidence(scored, text) > prompt_confidence(odd, shuffled)
        whole = await backend.complete(GenerationRequest(model="m", prompt=text, max_tokens=2,
                                                         temperature=0, prompt_logprobs=4))
        assert whole.prompt_logprobs is not None
        assert "".join(t.token for t in whole.prompt_logprobs) == " the lazy dog."

    asyncio.run(_with_backend(body))


def test_a_scored_prefix_is_not_read_again(small_model_path):
    """The scores of a slot's cached tokens stay with the cache: a scored request that shares
    the previous one's system prompt reads only what follows the shared tokens, takes their
    scores from the cache (the previous request's, exactly), and scores like a cold read."""
    system = "You are a careful assistant for a team of Python programmers. " * 4

    def scored(user: str) -> GenerationRequest:
        return GenerationRequest(model="m", messages=[{"role": "system", "content": system},
                                                      {"role": "user", "content": user}],
                                 max_tokens=1, temperature=0, prompt_logprobs=512)

    async def read(backend, user: str):
        engine = backend._engine
        before = engine.decoded
        reply = await backend.complete(scored(user))
        return reply.prompt_logprobs, reply.usage.prompt_tokens, engine.decoded - before

    warm: dict = {}

    async def shared(backend):
        warm["first"] = await read(backend, "Reverse a list.")
        warm["second"] = await read(backend, "Sort a dictionary by its values.")

    cold: dict = {}

    async def alone(backend):
        cold["second"] = await read(backend, "Sort a dictionary by its values.")

    asyncio.run(_with_backend(shared))
    asyncio.run(_with_backend(alone))
    first, _, _ = warm["first"]
    scores, n, decoded = warm["second"]
    cold_scores, cold_n, cold_decoded = cold["second"]
    # Every token but the first is scored; a cold read decodes the whole prompt (the one
    # answer token is sampled, never decoded).
    assert n == cold_n and len(scores) == len(cold_scores) == n - 1 and cold_decoded == n
    # The tokens both prompts share (the template, the system prompt, the user turn's
    # opening) keep their cells and their scores: only the rest is read.
    same = next(i for i, (a, b) in enumerate(zip(first, scores, strict=False))
                if a.token != b.token)
    assert same > len(system) // 8  # the system prompt alone is dozens of tokens
    # Token 0 has no score, so `same` + 1 tokens are shared; the last of them is read again
    # for the logits that score the first new token.
    assert decoded == n - same
    assert [t.logprob for t in scores[:same]] == [t.logprob for t in first[:same]]
    # The cached scores are the ones a cold read computes, and so are the rest (llama.cpp's
    # arithmetic differs a little with the batch's size: a few hundredths, a tenth at most).
    assert [t.token for t in scores] == [t.token for t in cold_scores]
    cached, rest = [t.logprob for t in scores], [t.logprob for t in cold_scores]
    assert cached[:same] == pytest.approx(rest[:same], abs=0.05)
    assert cached[same:] == pytest.approx(rest[same:], abs=0.3)
