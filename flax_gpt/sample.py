"""Generation with the Flax model over a key/value cache. By default the whole generation
(prefill, every decode step and slide, sampling included) is one compiled program, a
`lax.while_loop` over tokens on the device, so that a request costs one dispatch rather than
one per token (`Loop`); with `loop=False` each step is its own jitted call, one per token,
as torch_reference/sample.py runs them. flax_gpt.core.generation runs the host side of both
and says what the window and the sampling rule are.

    import flax_gpt

    model = flax_gpt.load("run/weights.safetensors")
    out = flax_gpt.generate(model, [1, 57, 9], 40, temperature=0.8, top_p=0.9, seed=1)
    out.tokens[0]                                       # the 40 new ids
    flax_gpt.generate(model, [[1, 57, 9], [1]], 40, temperature=0)  # a ragged batch, greedy

`cached=False` recomputes the whole window at every step (one jitted forward of fixed shape
(B, seq_len), padded on the right): the uncached reference the tests and the decode bench
hold the cache to."""

import functools
from typing import NamedTuple

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
    # (B, V): a prefix, never empty; top_p 1 keeps all (a float32 mass of 1 is reached early)
    kept = (rank < top_k) & ((before < top_p) | (top_p >= 1))
    probs = jnp.where(kept, probs, 0)
    cdf = jnp.cumsum(probs / probs.sum(axis=-1, keepdims=True), axis=-1)
    index = jnp.minimum(jnp.sum(cdf <= u[:, None].astype(cdf.dtype), axis=-1),
                        jnp.sum(kept, axis=-1) - 1)  # (B,): rounding never leaves the prefix
    return jnp.take_along_axis(order, index[:, None], axis=-1)[:, 0].astype(jnp.int32)


def pick(logits, u, knobs, greedy):
    """The next token of each row: the first largest logit, or sample_tokens with `knobs`
    (temperature, top_k, top_p)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else sample_tokens(logits, u, *knobs)


def _donated(*args):
    """The arguments (names or positions) a generation function donates on accelerators, so
    that XLA updates the cache in place; on CPU buffers are not donated (see
    flax_gpt.train.donated)."""
    return () if jax.default_backend() == "cpu" else args


# ---- the steps, as plain functions of the model: jitted one by one (the step-by-step path)
# ---- and traced together into one program (the loop path) --------------------------------

def prefill(model, ids, lengths, u, knobs, greedy):
    logits, cache = model.prefill(ids, lengths)
    return pick(logits, u, knobs, greedy), logits, cache


def decode(model, cache, tokens, positions, u, knobs, greedy):
    logits, cache = model.decode(tokens, cache, positions)
    return pick(logits, u, knobs, greedy), logits, cache


def merge(rows, fresh_logits, fresh, logits, cache, u, knobs, greedy):
    """Rows in `rows` take the logits and cache of a prefill (`fresh`), the others keep
    theirs; then each row's next token."""
    cache = jax.tree.map(lambda new, old: jnp.where(rows[:, None, None, None], new, old), fresh, cache)
    logits = jnp.where(rows[:, None], fresh_logits, logits)  # (B, V)
    return pick(logits, u, knobs, greedy), logits, cache


def slide(model, cache, tokens, positions, kept, rows, u, knobs, greedy):
    """A decode step in which the rows in `rows` re-encode their last tokens `kept` (B, keep)
    from position 0 instead: their cache and logits come from a prefill."""
    S = model.config.seq_len
    _, logits, cache = decode(model, cache, tokens, jnp.minimum(positions, S - 1), u, knobs, greedy)
    lengths = jnp.full(kept.shape[0], kept.shape[1], jnp.int32)
    _, fresh_logits, fresh = prefill(model, kept, lengths, u, knobs, greedy)
    return merge(rows, fresh_logits, fresh, logits, cache, u, knobs, greedy)


def forward(model, windows, lengths, u, knobs, greedy):
    logits = model(windows)  # (B, S, V)
    logits = logits[jnp.arange(windows.shape[0]), lengths - 1]  # (B, V)
    return pick(logits, u, knobs, greedy), logits


def jitted(step, donate_argnums=()):
    """`step` as one jitted function of (graphdef, state, *args), greedy static."""
    @functools.partial(jax.jit, static_argnames=("graphdef", "greedy"), donate_argnums=donate_argnums)
    def run(graphdef, state, *args, greedy):
        return step(nnx.merge(graphdef, state), *args, greedy=greedy)

    return run


# ---- the whole generation as one program -----------------------------------------------------

class Loop(NamedTuple):
    """The generation loop's state, on the device. Step i draws token i of every row (0 from
    the prefill) with the uniforms us[i]."""

    step: jax.Array  # tokens drawn so far
    tokens: jax.Array  # (B,) the last drawn, not yet in the cache
    positions: jax.Array  # (B,) where it goes: the window's length
    window: jax.Array  # (B, S) the tokens at positions 0..positions-1, then stale ones
    cache: tuple  # a LayerCache per layer
    done: jax.Array  # (B,) rows that drew the stop token
    slides: jax.Array  # steps at which some row's window slid
    out: jax.Array  # (max_new_tokens, B) the tokens of each step
    logits: jax.Array = None  # (max_new_tokens, B, V) with return_logits


def _record(loop, tokens, logits, stop):
    out = loop.out.at[loop.step].set(tokens)
    kept = None if loop.logits is None else loop.logits.at[loop.step].set(logits)
    return loop._replace(step=loop.step + 1, tokens=tokens, done=loop.done | (tokens == stop),
                         out=out, logits=kept)


def _advance(model, loop, us, knobs, stop, keep, greedy):
    """One step of flax_gpt.core.generation.run's cached loop: each row's last token goes
    into the cache and the next is drawn; if some row's window is full, its last `keep`
    tokens are re-encoded from position 0 (lax.cond: the prefill runs only at a slide)."""
    S = loop.window.shape[1]
    u, rows = us[loop.step], jnp.arange(loop.tokens.shape[0])
    full = loop.positions == S
    kept = jnp.concatenate([loop.window[:, S - keep + 1:], loop.tokens[:, None]], axis=1)  # (B, keep)
    tokens, logits, cache = jax.lax.cond(
        full.any(),
        lambda: slide(model, loop.cache, loop.tokens, loop.positions, kept, full, u, knobs, greedy),
        lambda: decode(model, loop.cache, loop.tokens, loop.positions, u, knobs, greedy))
    window = loop.window.at[rows, jnp.minimum(loop.positions, S - 1)].set(loop.tokens)
    window = jnp.where(full[:, None], jnp.pad(kept, ((0, 0), (0, S - keep))), window)  # (B, S)
    loop = loop._replace(positions=jnp.where(full, keep, loop.positions + 1), window=window,
                         cache=cache, slides=loop.slides + full.any())
    return _record(loop, tokens, logits, stop)


def _steps(model, loop, us, limit, knobs, stop, keep, greedy):
    """Steps until `limit` tokens per row are drawn or every row has stopped."""
    return jax.lax.while_loop(lambda loop: (loop.step < limit) & ~loop.done.all(),
                              lambda loop: _advance(model, loop, us, knobs, stop, keep, greedy), loop)


@functools.cache
def _generate():
    @functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "keep"),
                       donate_argnames=_donated("loop"))
    def generate(graphdef, state, loop, ids, us, limit, knobs, stop, *, greedy, keep):
        """The loop until `limit` tokens per row, one program. A loop at step 0 (blank: see
        FlaxDecoder.start) begins with the prefill of `ids` (B, W), the prompts, whose
        lengths are its positions; later calls go on where the last one stopped, the prefill
        skipped, so that a streamed generation runs the same program."""
        model = nnx.merge(graphdef, state)

        def begin(loop):
            tokens, logits, cache = prefill(model, ids, loop.positions, us[0], knobs, greedy)
            return _record(loop._replace(cache=cache), tokens, logits, stop)

        loop = jax.lax.cond(loop.step == 0, begin, lambda loop: loop, loop)
        return _steps(model, loop, us, limit, knobs, stop, keep, greedy)

    return generate


_prefill, _slide, _forward = jitted(prefill), jitted(slide), jitted(forward)


@functools.cache
def _decode():
    return jitted(decode, donate_argnums=_donated(2))  # (graphdef, state, cache, ...)


class FlaxDecoder:
    """The Flax model as flax_gpt.core.generation's decoder: each method takes numpy inputs,
    runs one jitted function, keeps the cache on the device and returns (tokens as numpy,
    logits on the device). With `loop` (the default), `start` and `resume` run the cached
    generation itself on the device, many steps per call."""

    def __init__(self, model, sampling, *, loop=True):
        self.graphdef, self.state = nnx.split(model)
        self.greedy, self.loop = sampling.greedy, loop
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
        tokens, logits, self.cache = _decode()(
            self.graphdef, self.state, self.cache, jnp.asarray(tokens, jnp.int32),
            jnp.asarray(positions, jnp.int32), self._u(u), self.knobs, greedy=self.greedy)
        return np.asarray(tokens), logits

    def slide(self, tokens, positions, kept, rows, u):
        """A decode step in which the rows in `rows` re-encode their last tokens `kept`
        (B, keep) from position 0 instead (see `slide`)."""
        tokens, logits, self.cache = _slide(self.graphdef, self.state, self.cache, jnp.asarray(tokens, jnp.int32),
                                            jnp.asarray(positions, jnp.int32), kept, jnp.asarray(rows),
                                            self._u(u), self.knobs, greedy=self.greedy)
        return np.asarray(tokens), logits

    def forward(self, windows, lengths, u):
        tokens, logits = _forward(self.graphdef, self.state, windows, lengths, self._u(u),
                                  self.knobs, greedy=self.greedy)
        return np.asarray(tokens), logits

    def start(self, ids, lengths, window, us, keep, stop_token, limit, return_logits=False):
        """The prefill of `ids` (B, W) and the loop (see Loop) until `limit` tokens per row.
        `window` (B, seq_len): the prompts' windows; `us` (max_new_tokens, B): every step's
        uniforms. Returns the tokens drawn, numpy (steps, B). With `return_logits` the loop
        keeps every step's logits on the device: (max_new_tokens rounded up, B, V)."""
        # the buffers' rows rounded up to a power of two, so that few programs are compiled
        us = self._u(np.pad(us, ((0, (1 << (len(us) - 1).bit_length()) - len(us)), (0, 0))))
        ids, lengths = jnp.asarray(ids), jnp.asarray(lengths)
        # what the prefill gives, for the blank loop (traced once per shape: jit's cache)
        _, logits, cache = _prefill.eval_shape(self.graphdef, self.state, ids, lengths, us[0], self.knobs,
                                               greedy=self.greedy)
        zeros = lambda like: jnp.zeros(like.shape, like.dtype)  # noqa: E731
        blank = Loop(jnp.int32(0), jnp.zeros(len(lengths), jnp.int32), lengths, jnp.asarray(window),
                     jax.tree.map(zeros, cache), jnp.zeros(len(lengths), bool), jnp.int32(0),
                     jnp.zeros(us.shape, jnp.int32),
                     jnp.zeros((*us.shape, logits.shape[-1]), logits.dtype) if return_logits else None)
        self.ids, self.us, self.keep = ids, us, keep
        self.stop = jnp.int32(-1 if stop_token is None else stop_token)
        self.running = blank
        return self.resume(limit)

    def resume(self, limit):
        """More steps of the loop `start` began, until `limit` tokens per row: the tokens drawn
        since, numpy (steps, B)."""
        drawn = int(self.running.step)
        self.running = _generate()(self.graphdef, self.state, self.running, self.ids, self.us, limit,
                                   self.knobs, self.stop, greedy=self.greedy, keep=self.keep)
        return self._drawn(drawn)

    def _drawn(self, since):
        loop = self.running
        return np.asarray(loop.out[since:int(loop.step)])

    def loop_results(self):
        """(slides, per-step logits (steps, B, V) numpy or None) of the loop so far."""
        loop = self.running
        logits = None if loop.logits is None else np.asarray(loop.logits[:int(loop.step)])
        return int(loop.slides), logits

    @staticmethod
    def numpy(logits):
        return np.asarray(logits)


def generate(model, prompt_ids, max_new_tokens=100, *, temperature=1.0, top_k=0, top_p=1.0,
             seed=0, stop_token=None, window_keep=None, on_token=None, cached=True,
             return_logits=False, loop=True):
    """Generate after `prompt_ids` (ids, or a list of id lists: a ragged batch) with the
    Flax `model` (put in eval mode). Returns a flax_gpt.core.generation.Generation; see
    flax_gpt.core.generation.run for the options. `loop` False: one jitted call per token
    instead of the whole generation on the device (the same tokens). torch_reference.generate
    takes the same arguments (but `loop`), and the same seed gives the same tokens in both
    where their probabilities agree."""
    return generation.generate(functools.partial(FlaxDecoder, loop=loop), model, prompt_ids,
                               max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               seed=seed, stop_token=stop_token, window_keep=window_keep,
                               on_token=on_token, cached=cached, return_logits=return_logits)
