"""Inference in both frameworks: cached decode held to the full forward of the same tokens at
every step (ragged prompts, across window slides), on each path (Flax's generation as one
program on the device, Flax's one jitted call per token, PyTorch's steps), Flax against
PyTorch token for token (greedy and sampled), and the inverse-CDF sampling rule itself."""

import functools

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import flax_gpt
import torch_reference
from flax_gpt import sample as flax_sample
from flax_gpt.core import generation
from flax_gpt.core.hparams import TrainConfig
from flax_gpt.sidebyside import decoding, pair
from flax_gpt.sidebyside.tolerances import DIRECT
from flax_gpt.train import FlaxBackend
from parity_tests.conftest import CONFIGS, tensors_for
from tests.conftest import assert_close
from torch_reference import sample as torch_sample

# Each generation path: "flax" runs the whole generation on the device (flax_gpt.sample.Loop),
# "flax-step" one jitted call per token.
GENERATE = {"flax": flax_gpt.generate, "flax-step": functools.partial(flax_gpt.generate, loop=False),
            "torch": torch_reference.generate}
FRAMEWORKS = ["flax", "torch"]
def model_for(path, models):
    """The Flax or PyTorch model of build_pair's `models` that `path` runs."""
    return models[0] if path.startswith("flax") else models[1]


# A trained model is confident: the top two logits of a greedy step stay this far apart.
TRAINED_TOP2_GAP = 0.1


@pytest.fixture(params=["highest", "float64"])
def precision(request):
    """float32 `highest` or float64 (JAX's x64 mode) for this test; `highest` after it."""
    pair.apply_precision(request.param)
    yield request.param
    pair.apply_precision("highest")


def ragged_prompts(config, seed=0):
    """Three prompts: one token, about half the window, and longer than the window."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, config.vocab_size, n).tolist()
            for n in (1, config.seq_len // 2 + 1, config.seq_len + 3)]


@nnx.jit
def flax_forward(model, ids):
    return model(ids)


def last_logits(framework, model, texts):
    """(len(texts), V): each text's last-token logits from the plain forward of the text
    (all texts in one batch, right-padded)."""
    ids = generation.pad(texts, max(map(len, texts)))
    if framework.startswith("flax"):
        logits = np.asarray(flax_forward(model, jnp.asarray(ids)))
    else:
        with torch.no_grad():
            logits = model(torch.from_numpy(ids).long()).numpy()
    return logits[np.arange(len(texts)), [len(t) - 1 for t in texts]]


def reference_logits(framework, model, prompts, tokens, keep=None):
    """(steps, B, V): at each step, the full forward of each row's window of its prompt and
    the tokens drawn before that step (the uncached reference of flax_gpt.core.generation)."""
    S = model.config.seq_len
    keep = generation.check_window_keep(keep, S)
    steps = len(tokens[0])
    texts = [generation.window(p + t[:s], S, keep) for s in range(steps) for p, t in zip(prompts, tokens)]
    return last_logits(framework, model, texts).reshape(steps, len(prompts), -1)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_cached_decode_is_the_full_forward_at_every_step(config_name, framework, precision):
    config = CONFIGS[config_name]
    model = model_for(framework, pair.build_pair(config, tensors_for(config_name), precision))
    prompts = ragged_prompts(config)
    n = 2 * config.seq_len + 2
    out = GENERATE[framework](model, prompts, n, temperature=0, return_logits=True)
    assert out.slides >= 2 and [len(t) for t in out.tokens] == [n] * 3
    assert out.logits[0].dtype == (np.float64 if precision == "float64" else np.float32)
    assert_close(np.stack(out.logits), reference_logits(framework, model, prompts, out.tokens),
                 rtol=0, atol=DIRECT[precision].layers)


@pytest.mark.parametrize("path", FRAMEWORKS)
@pytest.mark.parametrize("keep,attention", [(1, "explicit"), (16, "explicit"), (None, "fused")])
def test_window_keep_and_fused_attention(path, keep, attention):
    """keep 1 (the shortest re-encoding), keep = seq_len (re-encode at every step past the
    window) and fused attention in prefill and decode."""
    config = CONFIGS["tiny"]
    model = model_for(path, pair.build_pair(config, tensors_for("tiny"), attention=attention))
    prompts = ragged_prompts(config, seed=1)
    out = GENERATE[path](model, prompts, 40, temperature=0, window_keep=keep, return_logits=True)
    assert out.slides >= 2
    assert_close(np.stack(out.logits),
                 reference_logits(path, model, prompts, out.tokens, keep),
                 rtol=0, atol=DIRECT["highest"].layers)


@pytest.mark.parametrize("path", FRAMEWORKS)
def test_uncached_generation_draws_the_same_tokens(path):
    config = CONFIGS["d36-3heads"]
    model = model_for(path, pair.build_pair(config, tensors_for("d36-3heads")))
    options = dict(temperature=0.9, top_k=30, top_p=0.95, seed=4)
    cached = GENERATE[path](model, ragged_prompts(config), 30, **options)
    uncached = GENERATE[path](model, ragged_prompts(config), 30, cached=False, **options)
    assert cached.tokens == uncached.tokens and cached.slides == uncached.slides >= 2


@pytest.mark.parametrize("config_name,precision", [
    ("seq-len-1", "float64"),  # a slide at every step
    ("gpt2-options", "float64"), ("tiny", "highest")], indirect=["precision"])
def test_the_loop_on_the_device_is_the_step_by_step_loop(config_name, precision):
    """The whole generation as one program and one jitted call per token: the same tokens,
    slides and stops, and logits within the layers' tolerance (XLA may fuse the one program
    differently), sampled with a stop token, across slides. (Every other test here runs
    Flax's loop on the device.)"""
    config = CONFIGS[config_name]
    model = pair.build_pair(config, tensors_for(config_name), precision)[0]
    options = dict(temperature=1.1, top_k=20, top_p=0.9, seed=2, return_logits=True)
    step = GENERATE["flax-step"](model, ragged_prompts(config), 2 * config.seq_len + 2, **options)
    stop = step.tokens[1][config.seq_len]
    options["stop_token"] = stop
    step = GENERATE["flax-step"](model, ragged_prompts(config), 2 * config.seq_len + 2, **options)
    loop = GENERATE["flax"](model, ragged_prompts(config), 2 * config.seq_len + 2, **options)
    assert step.stopped[1] and step.slides >= 1
    assert (loop.tokens, loop.stopped, loop.steps, loop.slides) == (step.tokens, step.stopped, step.steps, step.slides)
    assert_close(np.stack(loop.logits), np.stack(step.logits), rtol=0, atol=DIRECT[precision].layers)
    assert loop.first_token_s is None and step.first_token_s > 0  # one call: no token came earlier


def counting_batch(config, batch_size, seed):
    """(1, B, T) ids and labels of rows that count up by 1, 2 or 3 from a random start, mod
    vocab_size: the next token follows from the last two."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, config.vocab_size, (batch_size, 1))
    stride = rng.integers(1, 4, (batch_size, 1))
    rows = (start + stride * np.arange(config.seq_len + 1)) % config.vocab_size
    return rows[None, :, :-1].astype(np.int32), rows[None, :, 1:].astype(np.int32)


@pytest.fixture(scope="module")
def trained_tiny():
    """Canonical tensors of the tiny preset after 300 AdamW steps on counting rows: a model
    with confident, structured next-token distributions, unlike a random init."""
    config = CONFIGS["tiny"]
    tc = TrainConfig(steps=300, batch_size=16, lr=1e-2, warmup_steps=20)
    backend = FlaxBackend(config, tc, tensors_for("tiny"))
    for i in range(tc.steps):
        backend.step(i, *counting_batch(config, tc.batch_size, seed=i))
    return backend.canonical()


COUNTING_PROMPTS = [[5, 6, 7, 8], [1, 3], [60, 63, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35, 38, 41, 44, 47]]


def test_flax_and_torch_greedy_agree(trained_tiny):
    """float64: the same tokens, logits within 1e-12 at every step. float32: the same tokens
    up to the first near tie (top two logits within twice the frameworks' difference), and
    the trained model leaves none in these 60 steps. One test for both precisions, so that
    the trained weights are trained once (a module fixture is built once per xdist worker)."""
    for precision_name in ("float64", "highest"):
        pair.apply_precision(precision_name)
        try:
            fm, tm = pair.build_pair(CONFIGS["tiny"], trained_tiny, precision_name)
            c = decoding.compare_generation(fm, tm, COUNTING_PROMPTS, 60, temperature=0)
        finally:
            pair.apply_precision("highest")
        assert c.first_near_tie is None and c.agree, (precision_name, c.first_near_tie, c.first_mismatch)
        assert c.slides >= 3 and len(c.step_logits_diff) == 60
        assert c.max_logits_diff <= DIRECT[precision_name].layers, precision_name
        assert np.min(c.step_top2_gap) > TRAINED_TOP2_GAP  # trained: no step is close to a tie
        assert c.flax[0][:4] == [9, 10, 11, 12]  # it learned to count


def test_float32_greedy_tokens_of_random_weights(config_name):
    """Random weights give flat logits, close to ties: the two stay within float32's
    difference, and wherever their greedy tokens part, a near tie came first (or at that
    step). On these configs they have not parted; the test below makes them."""
    config = CONFIGS[config_name]
    fm, tm = pair.build_pair(config, tensors_for(config_name))
    c = decoding.compare_generation(fm, tm, ragged_prompts(config), 2 * config.seq_len + 2, temperature=0)
    if not c.agree:
        assert c.first_near_tie is not None and c.first_near_tie <= c.first_mismatch
    assert c.max_logits_diff <= DIRECT["highest"].layers


def test_tokens_that_part_at_a_near_tie_are_reported_there():
    """Two tokens lead every step by far and are tied but for EPS, which favours one in the
    Flax model and the other in PyTorch's: greedy tokens part at the first step, and that
    step is reported as a near tie (the frameworks' logits differ by EPS there, their top
    two are EPS apart). The same two models with the tie broken alike agree."""
    eps, lead, (a, b) = 1e-3, 50.0, (3, 7)
    config = CONFIGS["tiny"]
    tensors = dict(tensors_for("tiny"))
    tensors["pred.weight"] = tensors["pred.weight"].copy()
    tensors["pred.weight"][b] = tensors["pred.weight"][a]

    def leading(winner):
        bias = tensors["pred.bias"].copy()
        bias[[a, b]] = lead
        bias[winner] += eps
        return {**tensors, "pred.bias": bias}

    fm = pair.build_pair(config, leading(b))[0]
    c = decoding.compare_generation(fm, pair.build_pair(config, leading(a))[1], [[1], [2, 3]], 4,
                                    temperature=0)
    assert [row[0] for row in c.flax] == [b, b] and [row[0] for row in c.torch] == [a, a]
    assert c.first_mismatch == 0 and c.first_near_tie == 0
    assert c.step_logits_diff[0] == pytest.approx(eps, rel=1e-3)
    same = decoding.compare_generation(fm, pair.build_pair(config, leading(b))[1], [[1], [2, 3]], 4,
                                       temperature=0)
    assert same.agree and same.flax == [[b] * 4, [b] * 4]


@pytest.mark.parametrize("nan_in", ["flax", "both"])
def test_a_nan_at_any_step_fails_the_comparison(nan_in):
    """Finite logits at steps 0 and 2, NaN at step 1 (in Flax's, or in both at the same
    place): the maximum is NaN and the comparison does not agree, though the tokens do. A
    Python max() over the steps would have kept step 0's 0.1 and passed."""
    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(2, 5)) for _ in range(3)]
    flax_logits = [a + 0.1 for a in logits]
    flax_logits[1][0, 3] = np.nan
    if nan_in == "both":
        logits[1][0, 3] = np.nan
    tokens = [[1, 2, 3], [4, 0, 2]]
    c = decoding.compare_outputs(SimpleNamespace(tokens=tokens, logits=flax_logits, slides=0),
                                 SimpleNamespace(tokens=tokens, logits=logits, slides=0))
    assert c.first_mismatch is None and len(c.step_logits_diff) == 3
    assert np.isnan(c.step_logits_diff[1]) and c.step_logits_diff[0] == pytest.approx(0.1)
    assert np.isnan(c.max_logits_diff) and not c.agree
    assert not c.to_dict()["agree"]


def test_sampling_with_one_seed_gives_the_same_tokens_in_both(precision):
    config = CONFIGS["d36-3heads"]
    fm, tm = pair.build_pair(config, tensors_for("d36-3heads"), precision)
    options = dict(temperature=1.3, top_k=50, top_p=0.95, seed=7)
    c = decoding.compare_generation(fm, tm, ragged_prompts(config), 30, **options)
    assert c.agree and c.slides >= 2, c.first_mismatch
    other = flax_gpt.generate(fm, ragged_prompts(config), 30, **{**options, "seed": 8})
    assert other.tokens != c.flax  # the seed matters


SAMPLER = {"flax": (flax_sample.sample_tokens, jnp.asarray), "torch": (torch_sample.sample_tokens, torch.tensor)}
# ids 0..3 with probabilities .2 .5 .1 .2: sorted 1, 0, 3, 2 (the tie by id), CDF .5 .7 .9 1
PROBS = [0.2, 0.5, 0.1, 0.2]


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("u,temperature,top_k,top_p,expected", [
    (0.0, 1, 4, 1.0, 1), (0.48, 1, 4, 1.0, 1), (0.52, 1, 4, 1.0, 0), (0.69, 1, 4, 1.0, 0),
    (0.71, 1, 4, 1.0, 3), (0.89, 1, 4, 1.0, 3), (0.95, 1, 4, 1.0, 2), (0.9999999, 1, 4, 1.0, 2),
    (0.70, 1, 2, 1.0, 1), (0.72, 1, 2, 1.0, 0),  # top-k 2: 5/7, 2/7
    (0.99, 1, 4, 0.5, 1),  # top-p .5: the likeliest alone holds it
    (0.72, 1, 4, 0.6, 0), (0.99, 1, 4, 0.6, 0),  # top-p .6: ids 1, 0
    (0.80, 1, 4, 0.75, 3), (0.99, 1, 4, 0.75, 3),  # top-p .75: ids 1, 0, 3 (CDF .56 .78 1)
    (0.99, 1, 2, 0.75, 0),  # top-k before top-p
    (0.80, 0.5, 4, 1.0, 0), (0.90, 0.5, 4, 1.0, 3),  # T .5: p^2, CDF .735 .853 .971 1
])
def test_inverse_cdf_sampling(framework, u, temperature, top_k, top_p, expected):
    sample, tensor = SAMPLER[framework]
    logits = tensor(np.log([PROBS, PROBS]).astype(np.float32))
    tokens = sample(logits, tensor(np.array([u, u], np.float32)), temperature, top_k, top_p)
    assert np.asarray(tokens).tolist() == [expected, expected]


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_greedy_takes_the_first_of_tied_logits(framework):
    pick = {"flax": flax_sample.pick, "torch": torch_sample.pick}[framework]
    tensor = SAMPLER[framework][1]
    logits = tensor(np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 0.0, 5.0, 5.0]], np.float32))
    assert np.asarray(pick(logits, None, None, True)).tolist() == [1, 0]


@pytest.mark.parametrize("path", FRAMEWORKS)
def test_stop_token_and_streaming(path, monkeypatch):
    """A row stops after its stop token; the others go on; on_token sees every step's
    tokens as they come, None for stopped rows; the result matches what was streamed and
    what the same seed drew unstreamed. The loop on the device streams in calls of at most 3
    steps here, so that several resume."""
    monkeypatch.setattr(generation, "STREAM_CHUNK_MAX", 3)
    config = CONFIGS["tiny"]
    model = model_for(path, pair.build_pair(config, tensors_for("tiny")))
    prompts, sampling = ragged_prompts(config, seed=3), dict(temperature=0.8, top_k=20, seed=5)
    free = GENERATE[path](model, prompts, 20, **sampling)
    stop = free.tokens[1][4]  # row 1's fifth token
    seen = []
    out = GENERATE[path](model, prompts, 20, stop_token=stop, **sampling,
                         on_token=lambda step, tokens: seen.append((step, tokens)))
    row = free.tokens[1].index(stop) + 1
    assert out.tokens[1] == free.tokens[1][:row] and out.stopped[1]
    assert [s for s, _ in seen] == list(range(out.steps))
    streamed = [[t[b] for _, t in seen if t[b] is not None] for b in range(3)]
    assert streamed == out.tokens
    assert all(t[1] is None for _, t in seen[row:])
    for b in (0, 2):  # unaffected unless they drew the stop token themselves
        cut = free.tokens[b].index(stop) + 1 if stop in free.tokens[b] else 20
        assert out.tokens[b] == free.tokens[b][:cut]


def test_a_request_is_one_call_unless_streamed(monkeypatch):
    """Without on_token the loop on the device runs in one call; streamed, its first call
    returns the first token and the next ones at most STREAM_CHUNK_MAX steps each. One
    compiled program serves both, and requests whose lengths round up to the same power of
    two."""
    limits = []  # each call's `limit`: the tokens per row it runs to
    program = flax_sample._generate()
    monkeypatch.setattr(flax_sample, "_generate",
                        lambda: lambda *args, **kw: limits.append(args[5]) or program(*args, **kw))
    model = pair.build_pair(CONFIGS["tiny"], tensors_for("tiny"))[0]
    flax_gpt.generate(model, [1, 2], 20, temperature=0)
    compiled = program._cache_size()
    flax_gpt.generate(model, [3, 4], 30, temperature=0)
    assert limits == [20, 30]
    monkeypatch.setattr(generation, "STREAM_CHUNK_MAX", 4)
    flax_gpt.generate(model, [1, 2], 20, temperature=0, on_token=lambda step, tokens: None)
    streamed = limits[2:]
    assert streamed[0] == 1 and streamed[-1] == 20 and all(0 < b - a <= 4 for a, b in zip(streamed, streamed[1:]))
    assert program._cache_size() == compiled
