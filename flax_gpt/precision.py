"""The JAX side of the precision switch (flax_gpt/core/precision.py says what each name means)."""

import jax
import jax.numpy as jnp

from flax_gpt.core import precision


def apply(name):
    """Set JAX's default matmul precision for `name`; return what was set, for the record."""
    jax.config.update("jax_default_matmul_precision",
                      "highest" if precision.full_float32_matmuls(name) else None)
    return {**precision.record(name),
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision}


def dtype(name):
    """The Flax Linear compute dtype of precision `name`."""
    return jnp.bfloat16 if precision.compute_dtype_name(name) == "bfloat16" else jnp.float32
