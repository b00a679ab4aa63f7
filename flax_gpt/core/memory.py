"""How much memory a model config needs, and a clear refusal of what cannot fit.

Framework-free. Without it, `--seq-len 100000` (or a weights file whose config says so) is
killed by the kernel's OOM killer part-way through, with nothing printed: the attention scores
alone are batch x heads x seq_len x seq_len floats per layer.

The estimate counts the large buffers and nothing else, so it errs low: a config refused here
cannot run, and one accepted may still be tight. Values of 4 bytes, 8 for the float64
precision (parameters, optimizer state and activations alike); bf16 runs keep float32
master weights, and their bf16 activations are counted as float32: still an upper bound on
those, against a lower bound on everything the estimate leaves out. On a device mesh, what
one device holds (see `estimate`).
"""

import os
from dataclasses import dataclass

from flax_gpt.core import precision as precisions
from flax_gpt.core.config import ConfigError
from flax_gpt.core.sharding import per_device_elements, tensor_ways

FLOAT32, FLOAT64 = 4, 8


def parameter_count(config):
    """The number of canonical parameters (weights.canonical_shapes, counted without listing
    them: a config of a million layers must be refused, not enumerated)."""
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    per_layer = 4 * (d * d + d) + 2 * 2 * d + (f * d + f) + (d * f + d)
    extra = ((config.seq_len * d if config.positions == "learned" else 0)  # embed.position
             + (2 * d if config.pre_norm else 0)  # decoder.final_norm
             + (0 if config.tie_embeddings else v * d + v))  # pred
    return v * d + config.n_layers * per_layer + extra


HELD = ("weights", "gradients and AdamW moments")  # for as long as the model lives


@dataclass(frozen=True)
class Estimate:
    """Bytes by part; `total` is their sum. `a + b`: two models held at once and computing
    one at a time (parity's pair, bench's variants), so their weights and optimizer state
    add up while only the larger of their step-time buffers is counted."""

    parts: dict

    @property
    def total(self):
        return sum(self.parts.values())

    def _transient(self):
        return sum(n for name, n in self.parts.items() if name not in HELD)

    def __mul__(self, n):
        """`n` alike, holding and computing at once (a mesh's devices in one host's memory)."""
        return Estimate({name: n * b for name, b in self.parts.items()})

    def __add__(self, other):
        larger = max(self, other, key=Estimate._transient)
        parts = {name: n for name, n in larger.parts.items() if name not in HELD}
        for name in HELD:
            held = self.parts.get(name, 0) + other.parts.get(name, 0)
            if held:
                parts[name] = held
        return Estimate(parts)


def estimate(config, batch_size, *, training, scores=True, kv_cache=False, precision="highest",
             mesh=None):
    """The memory one model of `config` needs on `batch_size` rows of `config.seq_len` tokens.

    training: weights, gradients and AdamW's two moments (4 copies of the parameters), and
    every layer's activations kept for the backward pass. Otherwise (eval, generate): the
    weights and one layer's activations at a time. `scores`: whether the attention scores
    and probabilities (batch x heads x seq_len x seq_len, per layer) are materialized; fused
    attention on an accelerator (flash kernels) does not keep them. `kv_cache`: decoding's
    keys and values of every layer, for the whole window. `precision`: 8 bytes a value for
    float64, else 4.

    `mesh` (a flax_gpt.core.sharding.MeshShape): what each device of that mesh holds. The
    parameters, gradients and moments as sharding.rules split them (over fsdp and tensor,
    sharding.per_device_elements); the activations of batch_size / (data * fsdp) rows, with
    the tensor axis splitting what its rules split by output: q, k, v, the attention output,
    scores and key/value cache by heads, fc1's output by d_ff, the logits by vocabulary; the
    residual stream, LayerNorm outputs and projections stay whole. Not counted: the whole
    weights fsdp gathers for a matmul, one layer at a time.
    """
    width = FLOAT64 if precisions.param_dtype_name(precision) == "float64" else FLOAT32
    b, t, d, f, v, h = (batch_size, config.seq_len, config.d_model, config.d_ff,
                        config.vocab_size, config.n_heads)
    elements = parameter_count(config)
    if mesh is not None:
        elements = per_device_elements(config, mesh)
        b = -(-b // mesh.batch_ways)  # this device's rows (a batch that does not split is refused)
        heads, v, f = (n // tensor_ways(n, mesh) for n in (h, v, f))
        d_heads = d // h * heads  # q, k, v or the attention output, of this device's heads
        h = heads
    else:
        d_heads = d
    layers = config.n_layers if training else 1
    params = elements * width
    parts = {"weights": params}
    if training:
        parts["gradients and AdamW moments"] = 3 * params
    # per layer: input, q, k, v, attention output, projection, two residual sums and two
    # LayerNorm outputs (10 of B x T x d, 4 of them by heads), fc1 output and its ReLU
    # (2 of B x T x d_ff)
    parts["activations"] = layers * b * t * (6 * d + 4 * d_heads + 2 * f) * width
    if scores:
        # scores and their softmax, both kept for the backward pass
        parts["attention scores"] = layers * 2 * b * h * t * t * width
    parts["logits"] = 2 * b * t * v * width  # logits and log-softmax
    if kv_cache:
        parts["key/value cache"] = 2 * config.n_layers * b * t * d_heads * width
    return Estimate(parts)


def physical_memory():
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def human(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000


SMALLER = "use a smaller --seq-len or --batch-size, or a smaller model"


def check(need, what, limit, where, hint=SMALLER):
    """Refuse (ConfigError, one line) when the Estimate `need` exceeds `limit` bytes of
    `where` (no check where the limit is unknown). `what` names the work, `hint` the way out."""
    if limit is None or need.total <= limit:
        return need
    largest = max(need.parts, key=need.parts.get)
    raise ConfigError(
        f"{what} needs at least {human(need.total)} of memory ({largest} alone "
        f"{human(need.parts[largest])}), more than the {human(limit)} of {where}: {hint}")
