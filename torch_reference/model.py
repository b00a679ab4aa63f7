"""The PyTorch reference GPT of SPEC.md. Mirrors flax_gpt/model.py class by class.

Module names are the canonical weight names, so `state_dict()` *is* the canonical tensor set.
Read top to bottom: Embedding, MaskedMultiHeadAttention, FeedForward, DecoderLayer, Decoder,
GPT, then loss and load/save.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flax_gpt.core import weights
from flax_gpt.core.config import (EMBED_INIT_STD, LINEAR_INIT_STD, GPTConfig, fused_attention,
                             positional_encoding)
from flax_gpt.core.data import IGNORE_INDEX

MASK_FILL = -1e9  # SPEC.md: scores.masked_fill(mask == 0, -1e9), not -inf


def at_least_float32(dtype):
    """float32 for bf16 (the loss, as torch.autocast does for softmax), else `dtype` itself."""
    return torch.promote_types(dtype, torch.float32)


class Embedding(nn.Module):
    """Token embedding plus the fixed sinusoidal table (not learned, not scaled)."""

    def __init__(self, config):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        # built in float64; GPT's .to(dtype) rounds it once, as Flax's table is rounded
        positional = torch.from_numpy(positional_encoding(config.seq_len, config.d_model, np.float64))
        self.register_buffer("positional", positional, persistent=False)  # not in the weights
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids):
        T = ids.shape[1]
        x = self.token(ids) + self.positional[:T]  # (B, T, d)
        return self.dropout(x)


class MaskedMultiHeadAttention(nn.Module):
    """Causal multi-head attention: SPEC.md's explicit -1e9 masked softmax or, with `fused`,
    the same function as one F.scaled_dot_product_attention call (flash kernels on a GPU)."""

    def __init__(self, config, *, fused):
        super().__init__()
        self.n_heads, self.fused = config.n_heads, fused
        self.q = nn.Linear(config.d_model, config.d_model)
        self.k = nn.Linear(config.d_model, config.d_model)
        self.v = nn.Linear(config.d_model, config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)
        causal = torch.tril(torch.ones(config.seq_len, config.seq_len, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        B, T, d = x.shape
        H, dk = self.n_heads, d // self.n_heads

        def heads(t):
            return t.view(B, T, H, dk)  # (B, T, H, dk)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.fused:  # takes (B, H, T, dk)
            y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
            y = y.transpose(1, 2)  # (B, H, T, dk) -> (B, T, H, dk)
        else:
            y = self.masked_softmax(q, k, v)
        return self.dropout(self.out(y.reshape(B, T, d)))  # (B, T, d): heads concatenated

    def masked_softmax(self, q, k, v):
        T, dk = q.shape[1], q.shape[3]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, dk)
        scores = q @ k.transpose(-2, -1) / math.sqrt(dk)  # (B, H, T, T)
        scores = scores.masked_fill(~self.causal_mask[:T, :T], MASK_FILL)
        attn = self.attn_dropout(torch.softmax(scores, dim=-1))  # autocast: float32 softmax
        return (attn @ v).transpose(1, 2)  # (B, H, T, dk) -> (B, T, H, dk)


class FeedForward(nn.Module):
    """Position-wise fc2(relu(fc1(x)))."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(F.relu(self.fc1(x))))


class DecoderLayer(nn.Module):
    """Post-LN block, exactly the article's: LN(x + mhma(x)), then LN(x + ffn(x))."""

    def __init__(self, config, *, fused):
        super().__init__()
        self.mhma = MaskedMultiHeadAttention(config, fused=fused)
        self.layer_norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.layer_norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)

    def forward(self, x):
        x = self.layer_norm1(x + self.mhma(x))
        x = self.layer_norm2(x + self.ffn(x))
        return x


class Decoder(nn.Module):
    def __init__(self, config, *, fused):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(config, fused=fused) for _ in range(config.n_layers)])

    def forward(self, x, *, return_hidden=False):
        hidden = []
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return (x, hidden) if return_hidden else x


class GPT(nn.Module):
    """logits = pred(decoder(embed(ids))). `attention`: one of config.ATTENTIONS."""

    def __init__(self, config: GPTConfig, *, attention="explicit", dtype=torch.float32):
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.decoder = Decoder(config, fused=fused_attention(attention, config))
        self.pred = nn.Linear(config.d_model, config.vocab_size)
        self.apply(self._init)
        self.to(dtype)  # parameters and the positional table (float64 for the float64 tier)

    @staticmethod
    def _init(module):
        """flax_gpt.core.config's init, the same in both frameworks: N(0, 0.02) Linear weights,
        zero biases, N(0, 1) embeddings, LayerNorm ones/zeros (PyTorch's default already)."""
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=EMBED_INIT_STD)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=LINEAR_INIT_STD)
            nn.init.zeros_(module.bias)

    def forward(self, ids, *, return_hidden=False):
        """ids (B, T) int -> logits (B, T, vocab); with `return_hidden`, also every layer's
        output and the embedding, for layer-by-layer parity."""
        if ids.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds seq_len {self.config.seq_len}")
        x = self.embed(ids)
        h, hidden = self.decoder(x, return_hidden=True)
        logits = self.pred(h)
        return (logits, {"embed": x, "layers": hidden}) if return_hidden else logits


def cross_entropy(logits, labels):
    """Mean cross-entropy over labels != -100 (nn.CrossEntropyLoss(ignore_index=-100))."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(at_least_float32(logits.dtype)),
                           labels.reshape(-1).long(), ignore_index=IGNORE_INDEX)


# ---- canonical weights: the one conversion each way (names and layouts: flax_gpt/core/weights.py)

def set_canonical(model, tensors):
    """Write canonical tensors (name -> numpy) into `model`, bit for bit: its state_dict
    names and layouts are the canonical ones. load_state_dict copies each into its
    parameter's dtype: a float32 file into a float64 model is an exact upcast."""
    model.load_state_dict({name: torch.from_numpy(np.array(t)) for name, t in tensors.items()})


def canonical(model):
    """`model`'s parameters as canonical tensors (name -> numpy, state_dict order)."""
    return {name: t.detach().cpu().numpy() for name, t in model.state_dict().items()}


def load(path, *, precision=None, attention="explicit", device="cpu", allow_nonfinite=False):
    """A ready model (eval mode) from a canonical weights file alone (NaN or Inf refused
    unless `allow_nonfinite`), at `precision` (one of flax_gpt.core.precision.PRECISIONS;
    default: the file's own dtype). "float64" upcasts a float32 file exactly."""
    from torch_reference import precision as precisions

    config, tensors = weights.load(path, allow_nonfinite=allow_nonfinite)
    model = GPT(config, attention=attention,
                dtype=precisions.dtype(precision or weights.precision_of(tensors)))
    set_canonical(model, tensors)
    return model.to(device).eval()


def save(model, path):
    """Write `model`'s parameters and config as a canonical weights file."""
    weights.save(path, model.config, canonical(model))
