"""The model config both frameworks build from, its presets, and the positional table.

Framework-free: imports neither jax nor torch, so both model files share it as-is.
"""

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from flax_gpt.core.errors import FlaxGPTError


class ConfigError(FlaxGPTError, ValueError):
    """A config or setting whose value cannot be used."""


def check_number(name, value, *, low=None, high=None, low_open=False, high_open=False,
                 integer=False):
    """`value` if it is a finite number (an int where `integer`) within [low, high] (an open
    end where `low_open` / `high_open`); else a ConfigError naming `name`.

    argparse's float() accepts "nan" and "inf", and NaN compares False with everything, so a
    range test alone lets it through: finiteness is checked first, for every setting.
    """
    kind = numbers.Integral if integer else numbers.Real
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        lo = "" if low is None else f"{'>' if low_open else '>='} {_number(low)}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {_number(high)}"
        raise ConfigError(f"{name} must be {' and '.join(x for x in (lo, hi) if x)}, "
                          f"got {_number(value)}")
    return value


def _number(x):
    return str(x) if isinstance(x, numbers.Integral) else f"{x:g}"


@dataclass(frozen=True)
class GPTConfig:
    """SPEC.md's model: field names are the contract's, defaults are its defaults."""

    vocab_size: int
    seq_len: int  # maximum context
    d_model: int
    n_heads: int
    n_layers: int
    d_ff: int = 0  # 0 means 4 * d_model
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    # GPT-2 family options (SPEC.md); the defaults are the article's model
    norm: str = "post"  # "pre": LN before each sublayer, plus decoder.final_norm
    activation: str = "relu"  # or "gelu_tanh", GPT-2's gelu_new
    positions: str = "sinusoidal"  # or "learned": embed.position.weight
    tie_embeddings: bool = False  # pred.weight is embed.token.weight, and pred has no bias
    init: str = "article"  # or "gpt2": see init_stds

    def __post_init__(self):
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("vocab_size", "seq_len", "d_model", "n_heads", "n_layers", "d_ff"):
            check_number(f"config {name}", getattr(self, name), low=1, integer=True)
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}: "
                f"each head takes d_model // n_heads rows")
        check_number("dropout", self.dropout, low=0, high=1, high_open=True)
        check_number("layer_norm_eps", self.layer_norm_eps, low=0, low_open=True)
        for name, choices in OPTIONS.items():
            value = getattr(self, name)
            if type(value) is not type(choices[0]) or value not in choices:
                raise ConfigError(f"config {name} must be one of {', '.join(map(str, choices))}, "
                                  f"got {value!r}")

    @property
    def pre_norm(self):
        return self.norm == "pre"

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, fields):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ConfigError(f"unknown config fields {unknown}; known: {sorted(names)}")
        try:
            return cls(**fields)
        except TypeError as e:
            raise ConfigError(f"incomplete config: {e}") from None

    @classmethod
    def from_json(cls, text):
        try:
            fields = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"config is not valid JSON: {e}") from None
        if not isinstance(fields, dict):
            raise ConfigError("config JSON must be an object")
        return cls.from_dict(fields)

    @classmethod
    def preset(cls, name, **overrides):
        """A named preset with fields replaced by the non-None `overrides`; a new d_model
        without a d_ff keeps d_ff at 4 * d_model where the preset has it so."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
        base, given = PRESETS[name], {k: v for k, v in overrides.items() if v is not None}
        if "d_model" in given and "d_ff" not in given and base.d_ff == 4 * base.d_model:
            given["d_ff"] = 0
        return base.replace(**given)


# How both models compute attention. "explicit" is SPEC.md's formula written out: scores,
# -1e9 masked fill, softmax, @ v. "fused" hands the same function to the framework's one call,
# jax.nn.dot_product_attention / F.scaled_dot_product_attention (cuDNN / flash kernels on a
# GPU); those calls have no dropout on the attention probabilities, so it needs dropout 0.
ATTENTIONS = ("explicit", "fused")


def check_attention(attention):
    if attention not in ATTENTIONS:
        raise ConfigError(f"unknown attention {attention!r}: choose one of {', '.join(ATTENTIONS)}")
    return attention


def fused_attention(attention, config):
    """True for "fused", False for "explicit"; a ConfigError for anything else, or for
    "fused" with dropout."""
    if check_attention(attention) == "fused" and config.dropout:
        raise ConfigError(f"fused attention has no attention dropout, and this config has dropout "
                          f"{config.dropout}: use attention 'explicit' or dropout 0")
    return attention == "fused"


# The values each GPT-2 family option may take (the first is the article's).
OPTIONS = {
    "norm": ("post", "pre"),
    "activation": ("relu", "gelu_tanh"),
    "positions": ("sinusoidal", "learned"),
    "tie_embeddings": (False, True),
    "init": ("article", "gpt2"),
}


class InitStds(NamedTuple):
    """The standard deviations of the normal init both models draw from; biases are zero and
    LayerNorms ones/zeros in every scheme."""

    embed: float  # embed.token and, when learned, embed.position
    linear: float  # every Linear weight but the two below
    residual: float  # mhma.out and ffn.fc2, the projections that feed the residual stream


RESIDUAL_PROJECTIONS = ("mhma.out", "ffn.fc2")  # InitStds.residual's Linears


def init_stds(config):
    """The init scheme of `config.init`. "article" (SPEC.md leaves it to us): Linear weights
    N(0, 0.02) and token embeddings N(0, 1), nn.Embedding's own default; the sinusoidal table
    is added unscaled, with entries of size ~0.7, and embeddings at 0.02 would sit 35x below
    it: the `small` preset then stalled at the unigram loss. "gpt2": N(0, 0.02) everywhere,
    the residual projections at 0.02 / sqrt(2 n_layers), so that the residual stream's
    variance does not grow with depth (GPT-2 paper, section 2.3)."""
    if config.init == "gpt2":
        return InitStds(embed=0.02, linear=0.02, residual=0.02 / math.sqrt(2 * config.n_layers))
    return InitStds(embed=1.0, linear=0.02, residual=0.02)


GPT2 = dict(norm="pre", activation="gelu_tanh", positions="learned", tie_embeddings=True,
            init="gpt2")

PRESETS = {
    # Tests: seconds to compile and run on a 2-core CPU.
    "tiny": GPTConfig(vocab_size=64, seq_len=16, d_model=32, n_heads=2, n_layers=2),
    # A few minutes of CPU training on tinyshakespeare (vocab_size comes from the data).
    "small": GPTConfig(vocab_size=11548, seq_len=64, d_model=256, n_heads=4, n_layers=4),
    # The article's model at GPT-2 small's shape; 50304 = 50257 padded to a multiple of 64
    # for synthetic benchmarks.
    "gpt2-124m": GPTConfig(vocab_size=50304, seq_len=1024, d_model=768, n_heads=12, n_layers=12),
    # GPT-2 itself (every option at GPT-2's value), and the shapes of its larger siblings.
    **{name: GPTConfig(vocab_size=50257, seq_len=1024, d_model=d, n_heads=h, n_layers=n, **GPT2)
       for name, (d, h, n) in {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 16, 24),
                               "gpt2-large": (1280, 20, 36), "gpt2-xl": (1600, 25, 48)}.items()},
}


def positional_encoding(seq_len, d_model, dtype=np.float32):
    """SPEC.md's fixed sinusoidal table `(seq_len, d_model)`, built in float64 and rounded
    once to `dtype` (float32, or float64 for the float64 tier).

    PE[p, 2i] = sin(p / 10000^(2i/d_model)), PE[p, 2i+1] = cos(p / 10000^(2i/d_model)).
    Both frameworks take this exact array, so the table cannot be a source of difference.
    """
    position = np.arange(seq_len, dtype=np.float64)[:, None]  # (T, 1)
    freq = 10000.0 ** (-np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # (ceil(d/2),)
    angle = position * freq  # (T, ceil(d/2))
    table = np.empty((seq_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle[:, : d_model // 2])  # odd d_model: the last column is a sin
    return table.astype(dtype)
