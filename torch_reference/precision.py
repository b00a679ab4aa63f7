"""The PyTorch side of the precision switch (flax_gpt/core/precision.py says what each name means)."""

import contextlib

import torch

from flax_gpt.core import precision


def apply(name):
    """Set PyTorch's float32 matmul precision for `name`; return what was set, for the record.

    `default` runs TF32 on a GPU, as JAX does there out of the box, so that both frameworks
    compute the same thing; on a CPU "high" could let oneDNN use bf16 passes where JAX does
    not, so it stays "highest" there."""
    fast = not precision.full_precision_matmuls(name) and torch.cuda.is_available()
    torch.set_float32_matmul_precision("high" if fast else "highest")
    torch.backends.cudnn.allow_tf32 = fast
    return {**precision.record(name),
            "torch_float32_matmul_precision": torch.get_float32_matmul_precision(),
            "torch_allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def dtype(name):
    """The parameters' dtype at precision `name`."""
    return getattr(torch, precision.param_dtype_name(name))


def autocast(name, device_type="cpu"):
    """The context the PyTorch forward runs in: autocast for bf16, nothing otherwise."""
    if precision.compute_dtype_name(name) == "bfloat16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
