"""Generation with the Flax model: prefill and one-token decode over a key/value cache, each
one jitted function over `nnx.split` state, reused for every token. Mirrors
torch_reference/sample.py; flax_gpt.core.generation runs the loop and says what the window
and the sampling rule are.

    import flax_gpt

    model = flax_gpt.load("run/weights.safetensors")
    out = flax_gpt.generate(model, [1, 57, 9], 40, temperature=0.8, top_p=0.9, seed=1)
    out.tokens[0]                                       # the 40 new ids
    flax_gpt.generate(model, [[1, 57, 9], [1]], 40, temperature=0)  # a ragged batch, greedy

`cached=False` recomputes the whole window at every step (one jitted forward of fixed shape
(B, seq_len), padded on the right): the uncached reference the tests and the decode bench
hold the cache to.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_gpt.core import generation
from flax_gpt.model import at_least_float32


def sample_tokens(logits, u, temperature, top_k, top_p):
    """Inverse-CDF sampling (flax_gpt.core.generation): logits (B, V), u (B,) uniforms in
    [0, 1), `top_k` tokens kept (1..V), `top_p` in (0, 1]. Returns int32 (B,)."""
    logits = logits.astype(at_least_float32(logits.dtype)) / temperature
    order = jnp.argsort(-logits, axis=-1, stable=True)  # (B, V): likeliest first, ties by id
    probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)  # (B, V) sorted
    rank = jnp.arange(logits.shape[-1])
    probs = jnp.where(rank < top_k, probs, 0)
    probs = probs / probs.sum(axis=-1, keepdims=True)
    before = jnp.cumsum(probs, axis=-1) - probs  # the mass of the likelier tokens
    kept = (rank < top_k) & (before < top_p)  # (B, V): a prefix, never empty
    probs = jnp.where(kept, probs, 0)
    cdf = jnp.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
    index = jnp.minimum(jnp.sum(cdf <= u[:, None].astype(cdf.dtype), axis=-1),
                        jnp.sum(kept, axis=-1) - 1)  # (B,): rounding never leaves the prefix
    return jnp.take_along_axis(order, index[:, None], axis=-1)[:, 0].astype(jnp.int32)


def pick(logits, u, knobs, greedy):
    """The next token of each row: the first largest logit, or sample_tokens with `knobs`
    (temperature, top_k, top_p)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else sample_tokens(logits, u, *knobs)


def _donated_cache():
    """The decode steps donate the cache on accelerators, so that XLA updates it in place;
    on CPU buffers are not donated (see flax_gpt.train.donated)."""
    return () if jax.default_backend() == "cpu" else ("cache",)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"))
def _prefill(graphdef, state, ids, lengths, u, knobs, *, greedy):
    logits, cache = nnx.merge(graphdef, state).prefill(ids, lengths)
    return pick(logits, u, knobs, greedy), logits, cache


@functools.cache
def _decode_step():
    @functools.partial(jax.jit, static_argnames=("graphdef", "greedy"),
                       donate_argnames=_donated_cache())
    def step(graphdef, state, cache, tokens, positions, u, knobs, *, greedy):
        logits, cache = nnx.merge(graphdef, state).decode(tokens, cache, positions)
        return pick(logits, u, knobs, greedy), logits, cache

    return step


@functools.partial(jax.jit, static_argnames=("greedy",))
def _merge(rows, fresh_logits, fresh, logits, cache, u, knobs, *, greedy):
    """Rows in `rows` take the logits and cache of a prefill (`fresh`), the others keep
    theirs; then each row's next token."""
    cache = jax.tree.map(lambda new, old: jnp.where(rows[:, None, None, None], new, old), fresh, cache)
    logits = jnp.where(rows[:, None], fresh_logits, logits)  # (B, V)
    return pick(logits, u, knobs, greedy), logits, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"))
def _forward(graphdef, state, windows, lengths, u, knobs, *, greedy):
    logits = nnx.merge(graphdef, state)(windows)  # (B, S, V)
    logits = logits[jnp.arange(windows.shape[0]), lengths - 1]  # (B, V)
    return pick(logits, u, knobs, greedy), logits


class FlaxDecoder:
    """The Flax model as flax_gpt.core.generation's decoder: each method takes numpy inputs,
    runs one jitted function, keeps the cache on the device and returns (tokens as numpy,
    logits on the device)."""

    def __init__(self, model, sampling):
        self.graphdef, self.state = nnx.split(model)
        self.greedy = sampling.greedy
        dtype = at_least_float32(model.embed.token.embedding.dtype)  # the parameters'
        self.knobs = (jnp.asarray(sampling.temperature or 1.0, dtype),
                      jnp.int32(sampling.kept(model.config.vocab_size)), jnp.asarray(sampling.top_p, dtype))
        self.cache = None

    def _u(self, u):
        return jnp.asarray(u, self.knobs[0].dtype)

    def prefill(self, ids, lengths, u):
        tokens, logits, self.cache = _prefill(self.graphdef, self.state, ids, lengths, self._u(u),
                                              self.knobs, greedy=self.greedy)
        return np.asarray(tokens), logits

    def decode(self, tokens, positions, u):
        tokens, logits, self.cache = _decode_step()(
            self.graphdef, self.state, self.cache, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32), self._u(u), self.knobs, greedy=self.greedy)
        return np.asarray(tokens), logits

    def slide(self, tokens, positions, kept, rows, u):
        """A decode step in which the rows in `rows` re-encode their last tokens `kept`
        (B, keep) from position 0 instead: their cache and logits come from a prefill. Three
        jitted calls, each also used on its own, so that a slide compiles little."""
        _, logits = self.decode(tokens, positions, u)
        _, fresh_logits, fresh = _prefill(self.graphdef, self.state, kept, np.full(len(kept), kept.shape[1], np.int32),
                                          self._u(u), self.knobs, greedy=self.greedy)
        tokens, logits, self.cache = _merge(jnp.asarray(rows), fresh_logits, fresh, logits, self.cache,
                                            self._u(u), self.knobs, greedy=self.greedy)
        return np.asarray(tokens), logits

    def forward(self, windows, lengths, u):
        tokens, logits = _forward(self.graphdef, self.state, windows, lengths, self._u(u),
                                  self.knobs, greedy=self.greedy)
        return np.asarray(tokens), logits

    @staticmethod
    def numpy(logits):
        return np.asarray(logits)


def generate(model, prompt_ids, max_new_tokens=100, *, temperature=1.0, top_k=0, top_p=1.0,
             seed=0, stop_token=None, window_keep=None, on_token=None, cached=True,
             return_logits=False):
    """Generate after `prompt_ids` (ids, or a list of id lists: a ragged batch) with the
    Flax `model` (put in eval mode). Returns a flax_gpt.core.generation.Generation; see
    flax_gpt.core.generation.run for the options. torch_reference.generate takes the same
    arguments, and the same seed gives the same tokens in both where their probabilities
    agree."""
    return generation.generate(FlaxDecoder, model, prompt_ids, max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, stop_token=stop_token,
                               window_keep=window_keep, on_token=on_token, cached=cached,
                               return_logits=return_logits)
