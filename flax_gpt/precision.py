"""The JAX side of the precision switch (flax_gpt/core/precision.py says what each name means)."""

import jax
import jax.numpy as jnp

from flax_gpt.core import precision

DTYPES = {"float64": jnp.float64, "float32": jnp.float32, "bfloat16": jnp.bfloat16}


def apply(name):
    """Set JAX for precision `name`: x64 mode on for float64 only, full-precision matmuls for
    float64 and highest. Returns what was set, for the record."""
    jax.config.update("jax_enable_x64", precision.param_dtype_name(name) == "float64")
    jax.config.update("jax_default_matmul_precision",
                      "highest" if precision.full_precision_matmuls(name) else None)
    return {**precision.record(name, jax.default_backend()), "jax_enable_x64": bool(jax.config.jax_enable_x64),
            "jax_default_matmul_precision": jax.config.jax_default_matmul_precision}


def dtypes(name):
    """(param_dtype, compute dtype) of the Flax model at precision `name`."""
    return DTYPES[precision.param_dtype_name(name)], DTYPES[precision.compute_dtype_name(name)]
