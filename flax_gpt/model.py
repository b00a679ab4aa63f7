"""The Flax NNX GPT of SPEC.md. Mirrors torch_reference/model.py class by class.

Attribute names are the canonical weight names (flax_gpt/weights.py maps the leaves:
Linear kernel = weight.T, LayerNorm scale = weight, Embed embedding = weight).
Read top to bottom: LayerCache, Embedding, MaskedMultiHeadAttention, FeedForward,
DecoderLayer, Decoder, GPT, then loss and load/save.

`param_dtype` is the parameters' dtype (float32, or float64 for the float64 tier) and
`dtype` the matmul compute dtype. With bfloat16 the parameters stay float32 and only the
Linear layers run in bf16, as under torch.autocast: the residual stream, LayerNorm, softmax
and loss stay float32 (at least: in float64 everything is float64).

Inference: `GPT.prefill(ids, lengths)` encodes right-padded prompts and returns each row's
next-token logits and a key/value cache of fixed shape, (B, seq_len, H, dk) per layer;
`GPT.decode(token, cache, position)` adds one token per row at its own position and returns
the next logits and the cache, updated functionally. Both are pure functions of their
inputs, jit-able over `nnx.split` state, and one compiled decode step serves every token
(flax_gpt.sample runs them; flax_gpt.core.generation says what the window is).
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_gpt.core import weights
from flax_gpt.core.config import GPTConfig, fused_attention, init_stds, positional_encoding
from flax_gpt.core.data import IGNORE_INDEX

MASK_FILL = -1e9  # SPEC.md: scores.masked_fill(mask == 0, -1e9), not -inf


def at_least_float32(dtype):
    """float32 for bf16 (softmax and loss, as torch.autocast does), else `dtype` itself."""
    return jnp.promote_types(dtype, jnp.float32)


class Buffer(nnx.Variable):
    """A constant that is neither trained nor saved (PyTorch: a non-persistent buffer)."""


class LayerCache(NamedTuple):
    """One layer's keys and values, (B, seq_len, H, dk) each: row b's token at position p in
    [b, p]. Rows past a row's last position hold stale values that the mask never shows."""

    k: jax.Array
    v: jax.Array


class Embedding(nnx.Module):
    """Token embedding plus a position's row of the fixed sinusoidal table (not learned, not
    scaled) or, with positions "learned", of the trained table `position`."""

    def __init__(self, config, *, param_dtype, rngs):
        init = nnx.initializers.normal(init_stds(config).embed)
        self.token = nnx.Embed(config.vocab_size, config.d_model, param_dtype=param_dtype,
                               embedding_init=init, rngs=rngs)
        learned = config.positions == "learned"
        self.position = nnx.Embed(config.seq_len, config.d_model, param_dtype=param_dtype,
                                  embedding_init=init, rngs=rngs) if learned else None
        if not learned:
            table = positional_encoding(config.seq_len, config.d_model, np.dtype(param_dtype))
            self.positional = Buffer(jnp.asarray(table))
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, ids, positions=None):
        """ids (B, T); `positions` (B, T): each token's row of the positional table (default
        0..T-1 in every row)."""
        table = self.positional if self.position is None else self.position.embedding  # (S, d)
        table = table[:ids.shape[1]] if positions is None else table[positions]
        x = self.token(ids) + table  # (B, T, d)
        return self.dropout(x)


class Linear(nnx.Linear):
    """nn.Linear's twin: N(0, std) kernel, zero bias, matmul in `dtype`, and, like
    nn.Linear, one 2D matmul over all tokens: XLA's CPU backend runs the weight gradient of
    a (B, T, d) contraction at half the speed of the same (B*T, d) one."""

    def __init__(self, d_in, d_out, *, std, dtype, param_dtype, rngs):
        super().__init__(d_in, d_out, kernel_init=nnx.initializers.normal(std),
                         bias_init=nnx.initializers.zeros, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)

    def __call__(self, x):
        y = super().__call__(x.reshape(-1, x.shape[-1]))  # (B*T, d_out)
        return y.reshape(*x.shape[:-1], y.shape[-1])  # (B, T, d_out)


class MaskedMultiHeadAttention(nnx.Module):
    """Causal multi-head attention: SPEC.md's explicit -1e9 masked softmax or, with `fused`,
    the same function as one jax.nn.dot_product_attention call (cuDNN on a GPU)."""

    def __init__(self, config, *, dtype, param_dtype, fused, rngs):
        self.n_heads, self.fused = config.n_heads, fused
        d, kw = config.d_model, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stds = init_stds(config)
        self.q = Linear(d, d, std=stds.linear, **kw)
        self.k = Linear(d, d, std=stds.linear, **kw)
        self.v = Linear(d, d, std=stds.linear, **kw)
        self.out = Linear(d, d, std=stds.residual, **kw)
        self.causal_mask = Buffer(jnp.tril(jnp.ones((config.seq_len, config.seq_len), dtype=bool)))
        self.attn_dropout = nnx.Dropout(config.dropout, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x, *, return_kv=False):
        """x (B, T, d) at positions 0..T-1; with `return_kv`, also this layer's keys and
        values (B, T, H, dk), for a prefill."""
        B, T, d = x.shape
        q, k, v = self.heads(x)  # (B, T, H, dk) each
        if self.fused:
            y = self.fused_attention(q, k, v)  # (B, T, H, dk)
        else:
            y = self.masked_softmax(q, k, v, self.causal_mask[:T, :T])
        y = self.dropout(self.out(y.reshape(B, T, d)))  # (B, T, d): heads concatenated
        return (y, LayerCache(k, v)) if return_kv else y

    def decode(self, x, cache, position):
        """x (B, 1, d): each row's token at `position` (B,). Writes its key and value into
        `cache` at that position and attends over keys 0..position of its own row. Returns
        (y (B, 1, d), the new cache)."""
        B, _, d = x.shape
        q, k, v = self.heads(x)  # (B, 1, H, dk) each
        rows = jnp.arange(B)
        cache = LayerCache(cache.k.at[rows, position].set(k[:, 0]),
                           cache.v.at[rows, position].set(v[:, 0]))  # (B, S, H, dk)
        S = cache.k.shape[1]
        visible = jnp.arange(S)[None, :] <= position[:, None]  # (B, S)
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
        return tuple(t.reshape(B, T, H, dk) for t in (self.q(x), self.k(x), self.v(x)))  # (B, T, H, dk)

    def fused_attention(self, q, k, v, mask=None):
        """jax.nn.dot_product_attention on (B, T, H, dk) arrays (softmax in float32 inside,
        for bf16 inputs too): causal without `mask`, else `mask` as in masked_softmax.

        That softmax is float32 for float64 inputs too (jax/_src/nn/functions.py casts the
        logits down), which left the float64 tier ~1e-10 apart from PyTorch's exact float64
        SDPA: in float64 the same function is written out (no dropout: fused has none)."""
        if q.dtype == jnp.float64:
            T = q.shape[1]
            return self.masked_softmax(q, k, v, self.causal_mask[:T, :T] if mask is None else mask)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=mask is None)

    def masked_softmax(self, q, k, v, mask):
        """SPEC.md's attention: q (B, Tq, H, dk) over k, v (B, Tk, H, dk); `mask` (True: seen)
        broadcasts to (B, H, Tq, Tk)."""
        dk = q.shape[3]
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # (B, H, T, dk)
        scores = q @ k.swapaxes(-2, -1) / math.sqrt(dk)  # (B, H, Tq, Tk)
        scores = jnp.where(mask, scores, MASK_FILL)
        # softmax in float32 (at least) even for bf16 matmuls, as torch.autocast does
        probs = jax.nn.softmax(scores.astype(at_least_float32(scores.dtype)), axis=-1)
        attn = self.attn_dropout(probs.astype(v.dtype))
        return (attn @ v).transpose(0, 2, 1, 3)  # (B, H, Tq, dk) -> (B, Tq, H, dk)


ACTIVATIONS = {"relu": jax.nn.relu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class FeedForward(nnx.Module):
    """Position-wise fc2(activation(fc1(x))): ReLU, or GPT-2's tanh GELU."""

    def __init__(self, config, *, dtype, param_dtype, rngs):
        stds, kw = init_stds(config), dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(config.d_model, config.d_ff, std=stds.linear, **kw)
        self.fc2 = Linear(config.d_ff, config.d_model, std=stds.residual, **kw)
        self.activation = ACTIVATIONS[config.activation]
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.fc2(self.activation(self.fc1(x))))


def layer_norm(config, *, param_dtype, rngs):
    # PyTorch's epsilon (Flax's default is 1e-6) and two-pass variance, as PyTorch computes it
    return nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_eps, use_fast_variance=False,
                         param_dtype=param_dtype, rngs=rngs)


class DecoderLayer(nnx.Module):
    """Post-LN, the article's block: LN(x + mhma(x)), then LN(x + ffn(x)); or, with norm
    "pre", GPT-2's: x + mhma(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, config, *, dtype, param_dtype, fused, rngs):
        self.mhma = MaskedMultiHeadAttention(config, dtype=dtype, param_dtype=param_dtype,
                                             fused=fused, rngs=rngs)
        self.layer_norm1 = layer_norm(config, param_dtype=param_dtype, rngs=rngs)
        self.ffn = FeedForward(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = layer_norm(config, param_dtype=param_dtype, rngs=rngs)
        self.pre_norm = config.pre_norm

    def __call__(self, x):
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


class Decoder(nnx.Module):
    """The layers, then (norm "pre") the final LayerNorm."""

    def __init__(self, config, *, dtype, param_dtype, fused, rngs):
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, param_dtype=param_dtype,
                                             fused=fused, rngs=rngs)
                                for _ in range(config.n_layers)])
        pre = config.pre_norm
        self.final_norm = layer_norm(config, param_dtype=param_dtype, rngs=rngs) if pre else None

    def __call__(self, x, *, return_hidden=False):
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


class GPT(nnx.Module):
    """logits = pred(decoder(embed(ids))); with tie_embeddings, the token embedding is the
    prediction head (no bias) and there is no `pred`. `attention`: one of config.ATTENTIONS."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention="explicit"):
        self.config, self.dtype = config, dtype
        self.embed = Embedding(config, param_dtype=param_dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, param_dtype=param_dtype,
                               fused=fused_attention(attention, config), rngs=rngs)
        self.pred = None if config.tie_embeddings else Linear(
            config.d_model, config.vocab_size, std=init_stds(config).linear, dtype=dtype,
            param_dtype=param_dtype, rngs=rngs)

    def head(self, h):
        """Logits of decoder outputs h (..., d): pred, or the tied token embedding (its
        matmul in `dtype`, as pred's and as F.linear's under autocast)."""
        if self.pred is not None:
            return self.pred(h)
        w = self.embed.token.embedding[...].astype(self.dtype)  # (V, d)
        y = h.reshape(-1, h.shape[-1]).astype(self.dtype) @ w.T  # (N, V): one 2D matmul, as Linear
        return y.reshape(*h.shape[:-1], w.shape[0])  # (..., V)

    def __call__(self, ids, *, return_hidden=False):
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
        room = ((0, 0), (0, self.config.seq_len - T), (0, 0), (0, 0))
        cache = tuple(LayerCache(jnp.pad(kv.k, room), jnp.pad(kv.v, room)) for kv in kvs)  # (B, S, H, dk)
        last = h[jnp.arange(B), lengths - 1]  # (B, d)
        return self.head(last), cache

    def decode(self, token, cache, position):
        """One token per row: token (B,) at `position` (B,) (its row of the positional table,
        < seq_len; keys 0..position-1 of the row already in `cache`). Returns (logits
        (B, vocab) for the next token, the cache with this token's keys and values added)."""
        x = self.embed(token[:, None], position[:, None])  # (B, 1, d)
        h, cache = self.decoder.decode(x, cache, position)  # (B, 1, d)
        return self.head(h[:, 0]), cache


def cross_entropy(logits, labels):
    """Mean cross-entropy over labels != -100, as nn.CrossEntropyLoss(ignore_index=-100):
    the sum over kept positions divided by their count (NaN when none is kept, as in torch)."""
    logits = logits.reshape(-1, logits.shape[-1]).astype(at_least_float32(logits.dtype))  # (B*T, V)
    labels = labels.reshape(-1)  # (B*T,)
    keep = labels != IGNORE_INDEX
    picked = jnp.take_along_axis(logits, jnp.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(jnp.where(keep, nll, 0.0)) / jnp.sum(keep)


# ---- canonical weights: the one conversion each way (names and layouts: flax_gpt/core/weights.py)

def set_canonical(target, tensors):
    """Write canonical tensors (name -> numpy) into a GPT, or into the nnx.State of its
    Params, bit for bit."""
    state = nnx.state(target, nnx.Param) if isinstance(target, nnx.Module) else target
    # each tensor in its parameter's dtype: a float32 file into a float64 model is an exact upcast
    tree = jax.tree.map(lambda t, p: jnp.asarray(t, dtype=p.dtype), weights.to_flax(tensors),
                        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, tree)
    if isinstance(target, nnx.Module):
        nnx.update(target, state)


def canonical(source, config=None):
    """A GPT's parameters, or an nnx.State of Params (or of their gradients, then with
    `config`), as canonical tensors (name -> numpy, state_dict order)."""
    if isinstance(source, nnx.Module):
        config, source = source.config, nnx.state(source, nnx.Param)
    return weights.from_flax(config, jax.tree.map(np.asarray, nnx.to_pure_dict(source)))


def load(path, *, precision=None, attention="explicit", allow_nonfinite=False):
    """A ready model (eval mode) from a canonical weights file alone (NaN or Inf refused
    unless `allow_nonfinite`), at `precision` (see `build`)."""
    return build(*weights.load(path, allow_nonfinite=allow_nonfinite), precision=precision,
                 attention=attention)


def build(config, tensors, *, precision=None, attention="explicit"):
    """A ready model (eval mode) of `config` holding the canonical `tensors`, at `precision`
    (one of flax_gpt.core.precision.PRECISIONS; default: the tensors' own dtype). "float64"
    upcasts float32 tensors exactly and switches JAX's x64 mode on."""
    from flax_gpt import precision as precisions

    param_dtype, dtype = precisions.dtypes(precision or weights.precision_of(tensors))
    if param_dtype == jnp.float64:
        jax.config.update("jax_enable_x64", True)
    model = GPT(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, attention=attention)
    set_canonical(model, tensors)
    model.eval()
    return model


def save(model, path):
    """Write `model`'s parameters and config as a canonical weights file."""
    weights.save(path, model.config, canonical(model))
