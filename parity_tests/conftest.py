"""The parity suite runs in float32 at the highest matmul precision, on CPU, set once here
through the project's one precision switch."""

import functools

import numpy as np
import pytest

from flax_gpt.sidebyside.pair import apply_precision

apply_precision("highest")  # before anything is compiled: jit caches key on it

from flax_gpt.core.config import GPT2, GPTConfig  # noqa: E402
from flax_gpt.core.streams import synthetic_batch  # noqa: E402
from flax_gpt.sidebyside import pair  # noqa: E402

# Odd shapes on purpose: one head, seq_len 1, d_model not a power of two, d_ff not 4*d_model;
# and GPT-2's options (pre-norm, tanh GELU, learned positions, tied head, its init).
CONFIGS = {
    "tiny": GPTConfig.preset("tiny"),
    "one-head": GPTConfig(vocab_size=70, seq_len=8, d_model=24, n_heads=1, n_layers=3),
    "seq-len-1": GPTConfig(vocab_size=50, seq_len=1, d_model=16, n_heads=4, n_layers=1),
    "d36-3heads": GPTConfig(vocab_size=97, seq_len=12, d_model=36, n_heads=3, n_layers=2, d_ff=50),
    "gpt2-options": GPTConfig(vocab_size=61, seq_len=10, d_model=24, n_heads=3, n_layers=2, **GPT2),
}


@functools.cache
def tensors_for(name, seed=0):
    return pair.random_weights(CONFIGS[name], seed)


def batch(config, batch_size, seq_len, seed=0):
    """Random ids with SPEC labels; the last row's labels all -100 when batch_size > 1.

    With seq_len 1 SPEC's labels are all -100 (a row's only position has no next token
    inside it), and every gradient would be a comparison of zeros: such batches get random
    labels instead, as if the rows were cut from a longer stream."""
    x, y = synthetic_batch(config.vocab_size, batch_size, seq_len, seed, ignored_row=True)
    if seq_len == 1:
        labels = np.random.default_rng([seed, 1]).integers(0, config.vocab_size, y.shape)
        y = np.where(np.arange(batch_size)[:, None] < max(batch_size - 1, 1), labels, y)
    return x, y


@pytest.fixture(params=list(CONFIGS), scope="session")
def config_name(request):
    return request.param


@pytest.fixture(scope="module")
def old_jaxlib_cache_guard():
    """No reads from JAX's persistent compilation cache on jaxlib < 0.10 for the module.

    jaxlib 0.7.1 crashed the worker (segmentation fault in
    compilation_cache.get_executable_and_time) deserializing an executable of the
    false-alarm sweep after jax.clear_caches(); modules that retrace patched code compile
    in memory there instead."""
    import jax
    import jaxlib

    if jaxlib.version.__version_info__ >= (0, 10):
        yield
        return
    saved = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", saved)
