"""The PyTorch reference GPT of SPEC.md. Mirrors flax_gpt/model.py class by class.

Module names are the canonical weight names, so `state_dict()` *is* the canonical tensor set.
Read top to bottom: LayerCache, Embedding, MaskedMultiHeadAttention, FeedForward,
DecoderLayer, Decoder, GPT, then loss and load/save.

Inference, as in flax_gpt/model.py: `GPT.prefill(ids, lengths)` returns each row's
next-token logits and a key/value cache of fixed shape, (B, seq_len, H, dk) per layer;
`GPT.decode(token, cache, position)` adds one token per row at its own position and returns
the next logits and the cache. Unlike the Flax model, decode writes into the cache's tensors
in place (and returns them): PyTorch has no buffer donation, and a copy per token would cost
as much as reading the cache.
"""

import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flax_gpt.core import weights
from flax_gpt.core.config import (RESIDUAL_PROJECTIONS, GPTConfig, fused_attention, init_stds,
                                  positional_encoding)
from flax_gpt.core.data import IGNORE_INDEX

MASK_FILL = -1e9  # SPEC.md: scores.masked_fill(mask == 0, -1e9), not -inf


def at_least_float32(dtype):
    """float32 for bf16 (the loss, as torch.autocast does for softmax), else `dtype` itself."""
    return torch.promote_types(dtype, torch.float32)


class LayerCache(NamedTuple):
    """One layer's keys and values, (B, seq_len, H, dk) each: row b's token at position p in
    [b, p]. Rows past a row's last position hold stale values that the mask never shows."""

    k: torch.Tensor
    v: torch.Tensor


class Embedding(nn.Module):
    """Token embedding plus a position's row of the fixed sinusoidal table (not learned, not
    scaled) or, with positions "learned", of the trained table `position`."""

    def __init__(self, config):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        learned = config.positions == "learned"
        self.position = nn.Embedding(config.seq_len, config.d_model) if learned else None
        if not learned:
            # built in float64; GPT's .to(dtype) rounds it once, as Flax's table is rounded
            table = positional_encoding(config.seq_len, config.d_model, np.float64)
            self.register_buffer("positional", torch.from_numpy(table), persistent=False)  # not saved
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, ids, positions=None):
        """ids (B, T); `positions` (B, T): each token's row of the positional table (default
        0..T-1 in every row)."""
        table = self.positional if self.position is None else self.position.weight  # (S, d)
        table = table[:ids.shape[1]] if positions is None else table[positions]
        x = self.token(ids) + table  # (B, T, d)
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

    def forward(self, x, *, return_kv=False):
        """x (B, T, d) at positions 0..T-1; with `return_kv`, also this layer's keys and
        values (B, T, H, dk), for a prefill."""
        B, T, d = x.shape
        q, k, v = self.heads(x)  # (B, T, H, dk) each
        if self.fused:
            y = self.fused_attention(q, k, v)
        else:
            y = self.masked_softmax(q, k, v, self.causal_mask[:T, :T])
        y = self.dropout(self.out(y.reshape(B, T, d)))  # (B, T, d): heads concatenated
        return (y, LayerCache(k, v)) if return_kv else y

    def decode(self, x, cache, position):
        """x (B, 1, d): each row's token at `position` (B,). Writes its key and value into
        `cache` at that position (in place) and attends over keys 0..position of its own
        row. Returns (y (B, 1, d), the cache)."""
        B, _, d = x.shape
        q, k, v = self.heads(x)  # (B, 1, H, dk) each
        rows = torch.arange(B, device=x.device)
        cache.k[rows, position] = k[:, 0].to(cache.k.dtype)  # (B, S, H, dk)
        cache.v[rows, position] = v[:, 0].to(cache.v.dtype)
        S = cache.k.shape[1]
        visible = torch.arange(S, device=x.device)[None, :] <= position[:, None]  # (B, S)
        mask = visible[:, None, None, :]  # (B, 1, 1, S): over heads and the one query
        if self.fused:
            y = self.fused_attention(q, cache.k, cache.v, mask)  # (B, 1, H, dk)
        else:
            y = self.masked_softmax(q, cache.k, cache.v, mask)
        return self.dropout(self.out(y.reshape(B, 1, d))), cache  # (B, 1, d)

    def heads(self, x):
        """q, k, v of x (B, T, d), each split into heads: (B, T, H, dk)."""
        B, T, d = x.shape
        H, dk = self.n_heads, d // self.n_heads
        return tuple(t.view(B, T, H, dk) for t in (self.q(x), self.k(x), self.v(x)))  # (B, T, H, dk)

    @staticmethod
    def fused_attention(q, k, v, mask=None):
        """F.scaled_dot_product_attention on (B, T, H, dk) tensors (it takes (B, H, T, dk)):
        causal without `mask`, else `mask` as in masked_softmax."""
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                           attn_mask=mask, is_causal=mask is None)
        return y.transpose(1, 2)  # (B, H, Tq, dk) -> (B, Tq, H, dk)

    def masked_softmax(self, q, k, v, mask):
        """SPEC.md's attention: q (B, Tq, H, dk) over k, v (B, Tk, H, dk); `mask` (True: seen)
        broadcasts to (B, H, Tq, Tk)."""
        dk = q.shape[3]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, dk)
        scores = q @ k.transpose(-2, -1) / math.sqrt(dk)  # (B, H, Tq, Tk)
        scores = scores.masked_fill(~mask, MASK_FILL)
        attn = self.attn_dropout(torch.softmax(scores, dim=-1))  # autocast: float32 softmax
        return (attn @ v).transpose(1, 2)  # (B, H, Tq, dk) -> (B, Tq, H, dk)


ACTIVATIONS = {"relu": F.relu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}


class FeedForward(nn.Module):
    """Position-wise fc2(activation(fc1(x))): ReLU, or GPT-2's tanh GELU."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.d_ff)
        self.fc2 = nn.Linear(config.d_ff, config.d_model)
        self.activation = ACTIVATIONS[config.activation]
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.activation(self.fc1(x))))


class DecoderLayer(nn.Module):
    """Post-LN, the article's block: LN(x + mhma(x)), then LN(x + ffn(x)); or, with norm
    "pre", GPT-2's: x + mhma(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, config, *, fused):
        super().__init__()
        self.mhma = MaskedMultiHeadAttention(config, fused=fused)
        self.layer_norm1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.layer_norm2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.pre_norm = config.pre_norm

    def forward(self, x):
        return self.residuals(x, self.mhma(self.attention_input(x)))

    def prefill(self, x):
        """(output, this layer's LayerCache of x's T tokens, (B, T, H, dk))."""
        y, kv = self.mhma(self.attention_input(x), return_kv=True)
        return self.residuals(x, y), kv

    def decode(self, x, cache, position):
        y, cache = self.mhma.decode(self.attention_input(x), cache, position)
        return self.residuals(x, y), cache

    def attention_input(self, x):
        return self.layer_norm1(x) if self.pre_norm else x

    def residuals(self, x, attended):
        if self.pre_norm:
            x = x + attended
            return x + self.ffn(self.layer_norm2(x))
        x = self.layer_norm1(x + attended)
        return self.layer_norm2(x + self.ffn(x))


class Decoder(nn.Module):
    """The layers, then (norm "pre") the final LayerNorm."""

    def __init__(self, config, *, fused):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(config, fused=fused) for _ in range(config.n_layers)])
        pre = config.pre_norm
        self.final_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) if pre else None

    def forward(self, x, *, return_hidden=False):
        """The decoder's output; with `return_hidden`, also every layer's output."""
        hidden = []
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return (self.norm(x), hidden) if return_hidden else self.norm(x)

    def prefill(self, x):
        kvs = []
        for layer in self.layers:
            x, kv = layer.prefill(x)
            kvs.append(kv)
        return self.norm(x), kvs

    def decode(self, x, cache, position):
        new = []
        for layer, layer_cache in zip(self.layers, cache):
            x, layer_cache = layer.decode(x, layer_cache, position)
            new.append(layer_cache)
        return self.norm(x), tuple(new)

    def norm(self, x):
        return x if self.final_norm is None else self.final_norm(x)


class GPT(nn.Module):
    """logits = pred(decoder(embed(ids))); with tie_embeddings, the token embedding is the
    prediction head (no bias) and there is no `pred`. `attention`: one of config.ATTENTIONS."""

    def __init__(self, config: GPTConfig, *, attention="explicit", dtype=torch.float32):
        super().__init__()
        self.config = config
        self.embed = Embedding(config)
        self.decoder = Decoder(config, fused=fused_attention(attention, config))
        self.pred = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size)
        self._init()
        self.to(dtype)  # parameters and the positional table (float64 for the float64 tier)

    def _init(self):
        """flax_gpt.core.config.init_stds, the same in both frameworks: normal weights and
        embeddings, zero biases, LayerNorm ones/zeros (PyTorch's default already)."""
        stds = init_stds(self.config)
        for name, module in self.named_modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=stds.embed)
            if isinstance(module, nn.Linear):
                residual = name.endswith(RESIDUAL_PROJECTIONS)
                nn.init.normal_(module.weight, mean=0.0, std=stds.residual if residual else stds.linear)
                nn.init.zeros_(module.bias)

    def head(self, h):
        """Logits of decoder outputs h (..., d): pred, or the tied token embedding."""
        return F.linear(h, self.embed.token.weight) if self.pred is None else self.pred(h)

    def forward(self, ids, *, return_hidden=False):
        """ids (B, T) int -> logits (B, T, vocab); with `return_hidden`, also every layer's
        output and the embedding, for layer-by-layer parity."""
        if ids.shape[1] > self.config.seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds seq_len {self.config.seq_len}")
        x = self.embed(ids)
        h, hidden = self.decoder(x, return_hidden=True)
        logits = self.head(h)
        if not return_hidden:
            return logits
        hidden = {"embed": x, "layers": hidden}
        return logits, hidden if self.decoder.final_norm is None else {**hidden, "final_norm": h}

    def prefill(self, ids, lengths):
        """Encode right-padded prompts: ids (B, T), T <= seq_len, row b's prompt in
        ids[b, :lengths[b]] at positions 0..lengths[b]-1 (what follows is ignored). Returns
        (logits (B, vocab) of each row's last token, cache: a LayerCache per layer of
        (B, seq_len, H, dk), the prompt's keys and values in rows 0..T-1)."""
        B, T = ids.shape
        if T > self.config.seq_len:
            raise ValueError(f"prompt of {T} tokens exceeds seq_len {self.config.seq_len}")
        h, kvs = self.decoder.prefill(self.embed(ids))  # (B, T, d)
        room = (0, 0, 0, 0, 0, self.config.seq_len - T)  # F.pad: last dimension first
        cache = tuple(LayerCache(F.pad(kv.k, room), F.pad(kv.v, room)) for kv in kvs)  # (B, S, H, dk)
        last = h[torch.arange(B, device=h.device), lengths - 1]  # (B, d)
        return self.head(last), cache

    def decode(self, token, cache, position):
        """One token per row: token (B,) at `position` (B,) (its row of the positional table,
        < seq_len; keys 0..position-1 of the row already in `cache`). Returns (logits
        (B, vocab) for the next token, the cache with this token's keys and values added,
        in place)."""
        x = self.embed(token[:, None], position[:, None])  # (B, 1, d)
        h, cache = self.decoder.decode(x, cache, position)  # (B, 1, d)
        return self.head(h[:, 0]), cache


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
    unless `allow_nonfinite`), at `precision` (see `build`)."""
    return build(*weights.load(path, allow_nonfinite=allow_nonfinite), precision=precision,
                 attention=attention, device=device)


def build(config, tensors, *, precision=None, attention="explicit", device="cpu"):
    """A ready model (eval mode) of `config` holding the canonical `tensors` on `device`, at
    `precision` (one of flax_gpt.core.precision.PRECISIONS; default: the tensors' own
    dtype). "float64" upcasts float32 tensors exactly."""
    from torch_reference import precision as precisions

    model = GPT(config, attention=attention, dtype=precisions.dtype(precision or weights.precision_of(tensors)))
    set_canonical(model, tensors)
    return model.to(device).eval()


def save(model, path):
    """Write `model`'s parameters and config as a canonical weights file."""
    weights.save(path, model.config, canonical(model))
