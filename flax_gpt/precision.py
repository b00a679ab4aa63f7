"""The one precision switch both frameworks are set through, recorded with every result.

    highest  float32 matmuls at full precision in both (parity; no TF32 on GPU, no bf16
             passes on TPU): jax_default_matmul_precision="highest", torch "highest".
    default  each framework as it ships: JAX runs float32 matmuls as TF32 on GPU, PyTorch
             does not; this shows the gap a user gets out of the box.
    bf16     bfloat16 matmuls over float32 parameters: Flax Linear dtype=bfloat16, PyTorch
             torch.autocast(bfloat16). LayerNorm, softmax and the loss stay float32.

jax and torch are imported only by the function that needs them.
"""

import contextlib

PRECISIONS = ("highest", "default", "bf16")


def check(name):
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    return name


def compute_dtype_name(name):
    return "bfloat16" if check(name) == "bf16" else "float32"


def set_jax(name):
    import jax

    jax.config.update("jax_default_matmul_precision", "highest" if check(name) == "highest" else None)
    return jax.config.jax_default_matmul_precision


def set_torch(name):
    import torch

    # PyTorch's own default is already "highest" for float32 matmuls.
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = check(name) != "highest"
    return torch.get_float32_matmul_precision()


def flax_dtype(name):
    import jax.numpy as jnp

    return jnp.bfloat16 if check(name) == "bf16" else jnp.float32


def torch_autocast(name, device_type="cpu"):
    """The context the PyTorch forward runs in: autocast for bf16, nothing otherwise."""
    import torch

    if check(name) == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply(name, *, frameworks=("jax", "torch")):
    """Set every named framework to precision `name`; return what was set, for the record."""
    record = {"precision": check(name), "compute_dtype": compute_dtype_name(name)}
    if "jax" in frameworks:
        record["jax_default_matmul_precision"] = set_jax(name)
    if "torch" in frameworks:
        record["torch_float32_matmul_precision"] = set_torch(name)
    return record
