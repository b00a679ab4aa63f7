"""The framework-free generation loop (flax_gpt.core.generation): the window rule, the
cache bookkeeping of prefill, decode and slides, the uniform draws, refusals."""

import numpy as np
import pytest

from flax_gpt.core import generation
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.generation import GenerationError, Sampling
from tests.conftest import assert_same


@pytest.mark.parametrize("seq_len,keep,lengths", [
    (4, 2, [1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3]),
    (4, 4, [1, 2, 3, 4, 4, 4, 4, 4]),  # keep = seq_len: the classic sliding window
    (4, 1, [1, 2, 3, 4, 1, 2, 3, 4, 1]),
    (1, 1, [1, 1, 1, 1]),
])
def test_window_length(seq_len, keep, lengths):
    assert [generation.window_length(n, seq_len, keep) for n in range(1, len(lengths) + 1)] == lengths


def test_window_is_the_last_tokens():
    assert generation.window(list(range(8)), 4, 2) == [6, 7]  # n = 8: just slid (see above)
    assert generation.window(list(range(10)), 4, 2) == [6, 7, 8, 9]
    assert generation.window([7, 8], 4, 2) == [7, 8]


@pytest.mark.parametrize("keep,seq_len,resolved", [(None, 64, 32), (None, 1, 1), (None, 3, 1), (5, 5, 5)])
def test_window_keep_default(keep, seq_len, resolved):
    assert generation.check_window_keep(keep, seq_len) == resolved


@pytest.mark.parametrize("keep", [0, 65, True, 2.5])
def test_window_keep_refused(keep):
    with pytest.raises(GenerationError, match="window_keep"):
        generation.check_window_keep(keep, 64)


def test_prompt_rows():
    assert generation.prompt_rows([1, 2], 10) == [[1, 2]]
    assert generation.prompt_rows(np.array([1, 2]), 10) == [[1, 2]]
    assert generation.prompt_rows([[1], [2, 3, 4]], 10) == [[1], [2, 3, 4]]
    for bad, message in [([], "no prompt"), ([[1], []], "prompt 1 is empty"),
                         ([3, 10], "outside the vocabulary"), ([[-1]], "outside the vocabulary")]:
        with pytest.raises(GenerationError, match=message):
            generation.prompt_rows(bad, 10)


@pytest.mark.parametrize("fields,message", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1e-50), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=1.5), "top_k"), (dict(top_p=0), "top_p"),
    (dict(top_p=1.5), "top_p")])
def test_sampling_refusals(fields, message):
    with pytest.raises(GenerationError, match=message):
        Sampling(**fields)


def test_sampling_kept_and_widths():
    assert Sampling(top_k=0).kept(50) == 50 and Sampling(top_k=7).kept(50) == 7
    assert Sampling(top_k=99).kept(50) == 50 and Sampling(temperature=0).greedy
    assert [generation.prefill_width(n, 12) for n in (1, 2, 3, 5, 9, 12)] == [1, 2, 4, 8, 12, 12]


class WindowLengths:
    """A decoder whose "model" returns, as each row's next token, how many tokens its cache
    (or uncached window) holds after the step, and records the uniforms it was given. The
    tokens then spell out the loop's bookkeeping, to be checked against the window rule."""

    def __init__(self, seq_len):
        self.seq_len, self.draws, self.filled = seq_len, [], None

    def _out(self, tokens, u):
        self.draws.append(np.array(u))
        return np.asarray(tokens), np.asarray(tokens, np.float64)[:, None]

    def prefill(self, ids, lengths, u):
        assert ids.shape[1] <= self.seq_len and ids.dtype == np.int32
        self.filled = np.array(lengths)
        return self._out(lengths, u)

    def decode(self, tokens, positions, u):
        assert (positions == self.filled).all() and (positions < self.seq_len).all()
        self.filled = positions + 1
        return self._out(self.filled, u)

    def slide(self, tokens, positions, kept, rows, u):
        self.filled = np.where(rows, kept.shape[1], positions + 1)
        return self._out(self.filled, u)

    def forward(self, windows, lengths, u):
        assert windows.shape[1] == self.seq_len
        return self._out(lengths, u)

    numpy = staticmethod(np.asarray)


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("keep", [None, 1, 6])
def test_loop_follows_the_window_rule(cached, keep):
    S, prompts = 6, [[1], [1, 2, 3, 4, 5], [0] * 13]
    decoder = WindowLengths(S)
    out = generation.run(decoder, prompts, 20, seq_len=S, vocab_size=100, seed=5,
                         window_keep=keep, cached=cached, return_logits=True)
    k = generation.check_window_keep(keep, S)
    for p, tokens in zip(prompts, out.tokens):
        assert tokens == [generation.window_length(len(p) + s, S, k) for s in range(20)]
    assert out.slides > 0 and out.steps == 20 and len(out.logits) == 20
    rng = np.random.default_rng(5)  # one uniform per row per step, in order
    assert_same(np.stack(decoder.draws), [rng.random(3) for _ in range(20)])


def test_loop_stops_rows_and_streams():
    seen = []
    out = generation.run(WindowLengths(6), [[1], [1, 2]], 10, seq_len=6, vocab_size=100,
                         stop_token=3, on_token=lambda step, tokens: seen.append(tokens))
    assert out.tokens == [[1, 2, 3], [2, 3]] and out.stopped == [True, True]
    assert seen == [[1, 2], [2, 3], [3, None]] and out.steps == 3
    assert out.ids == [[1, 1, 2, 3], [1, 2, 2, 3]]


@pytest.mark.parametrize("options,message", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop_token=100), "stop_token"),
    (dict(window_keep=7), "window_keep"), (dict(seed=-1), "seed")])
def test_loop_refusals(options, message):
    options = {"max_new_tokens": 5, **options}
    with pytest.raises(FlaxGPTError, match=message):
        generation.run(WindowLengths(6), [[1]], options.pop("max_new_tokens"), seq_len=6,
                       vocab_size=100, **options)
