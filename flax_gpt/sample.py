"""Sampling from a Flax model with one jitted step of fixed shape.

The context window is always (1, seq_len), padded on the right: the model is causal, so the
padding never reaches the position being read, and every step reuses one compiled function.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_gpt.core.hparams import check_sampling


@functools.partial(jax.jit, static_argnums=(0, 5))
def _next_token(graphdef, state, window, position, key, top_k, temperature):
    model = nnx.merge(graphdef, state)
    logits = model(window)[0, position].astype(jnp.float32)  # (V,)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    greedy = jnp.argmax(logits)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, greedy)


def generate(model, ids, max_new_tokens, *, temperature=1.0, top_k=0, seed=0):
    """`ids` followed by `max_new_tokens` sampled ids (temperature 0: greedy). Same seed,
    same ids."""
    check_sampling(max_new_tokens, temperature, top_k, seed)
    model.eval()
    graphdef, state = nnx.split(model)
    seq_len = model.config.seq_len
    top_k = min(top_k, model.config.vocab_size) if top_k else 0
    key = jax.random.key(seed)
    out = list(ids)
    for i in range(max_new_tokens):
        context = out[-seq_len:]
        window = np.zeros((1, seq_len), np.int32)
        window[0, :len(context)] = context
        token = _next_token(graphdef, state, jnp.asarray(window), len(context) - 1,
                            jax.random.fold_in(key, i), top_k, jnp.float32(temperature))
        out.append(int(token))
    return out
