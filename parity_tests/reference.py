"""An independent float64 implementation of SPEC.md, for the parity suite only.

It imports nothing from flax_gpt or torch_reference: its own positional table, causal mask,
attention, LayerNorm, labels, loss, learning-rate schedule and AdamW, written from SPEC.md
and the documented training algorithm, with torch float64 autograd for gradients only. It
reads a canonical weights file with safetensors alone. A bug that both frameworks share
through the project's common modules (positional table, learning-rate schedule, labels, loss
conventions) cannot hide from it.
"""

import json
import math

import numpy as np
import torch
from safetensors import safe_open

IGNORE = -100
MASK = -1e9


def read_weights(path):
    """(config dict, {name: float64 tensor}) from a canonical safetensors file."""
    with safe_open(str(path), framework="np") as f:
        config = json.loads(f.metadata()["config"])
        tensors = {name: torch.from_numpy(f.get_tensor(name).astype(np.float64)) for name in f.keys()}
    return config, tensors


def sinusoids(seq_len, d_model):
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(p / 10000^(2i/d)), in float64."""
    table = torch.zeros(seq_len, d_model, dtype=torch.float64)
    for p in range(seq_len):
        for i in range(0, d_model, 2):
            angle = p / 10000 ** (i / d_model)
            table[p, i] = math.sin(angle)
            if i + 1 < d_model:
                table[p, i + 1] = math.cos(angle)
    return table


def norm(x, w, b, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def gelu_tanh(x):
    """GPT-2's gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def forward(config, w, ids):
    """logits (B, T, V) and every layer's output, from weights `w` (name -> tensor), for
    the article's model and every GPT-2 option (SPEC.md, "GPT-2 family options")."""
    B, T = ids.shape
    d, H = config["d_model"], config["n_heads"]
    dk = d // H
    eps = config.get("layer_norm_eps", 1e-5)
    pre = config.get("norm", "post") == "pre"
    act = gelu_tanh if config.get("activation", "relu") == "gelu_tanh" else torch.relu
    if config.get("positions", "sinusoidal") == "learned":
        x = w["embed.token.weight"][ids] + w["embed.position.weight"][:T]
    else:
        x = w["embed.token.weight"][ids] + sinusoids(T, d)
    future = torch.arange(T)[None, :] > torch.arange(T)[:, None]  # key j after query i
    outputs = []
    for i in range(config["n_layers"]):
        p = f"decoder.layers.{i}."

        def lin(h, name):
            return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

        def ln(h, i):
            return norm(h, w[p + f"layer_norm{i}.weight"], w[p + f"layer_norm{i}.bias"], eps)

        h = ln(x, 1) if pre else x
        q, k, v = (lin(h, f"mhma.{n}").reshape(B, T, H, dk).transpose(1, 2) for n in "qkv")
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dk)
        scores = scores.masked_fill(future, MASK)
        a = torch.softmax(scores, dim=-1) @ v  # (B, H, T, dk)
        a = lin(a.transpose(1, 2).reshape(B, T, d), "mhma.out")
        if pre:  # x + mhma(LN(x)), then x + ffn(LN(x))
            x = x + a
            x = x + lin(act(lin(ln(x, 2), "ffn.fc1")), "ffn.fc2")
        else:  # LN(x + mhma(x)), then LN(x + ffn(x))
            x = ln(x + a, 1)
            x = ln(x + lin(act(lin(x, "ffn.fc1")), "ffn.fc2"), 2)
        outputs.append(x)
    if pre:
        x = norm(x, w["decoder.final_norm.weight"], w["decoder.final_norm.bias"], eps)
    if config.get("tie_embeddings", False):
        return x @ w["embed.token.weight"].T, outputs
    return x @ w["pred.weight"].T + w["pred.bias"], outputs


def labels(ids):
    """SPEC.md's labels of rows of token ids: y[:, :-1] = x[:, 1:] (the next token inside the
    row) and y[:, -1] = -100 (the last position has none)."""
    ids = torch.as_tensor(np.asarray(ids)).long()
    y = torch.full_like(ids, IGNORE)
    y[..., :-1] = ids[..., 1:]
    return y


def loss_of(logits, labels):
    """Mean negative log-likelihood over labels != -100."""
    logp = torch.log_softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != IGNORE
    return -logp[keep.nonzero()[:, 0], labels[keep]].sum() / keep.sum()


def loss_and_grads(config, w, ids, labels):
    """(loss, logits, layer outputs, {name: gradient}) in float64."""
    # new leaves over the same storage: no copy, and the caller's tensors stay as they were
    w = {n: t.detach().requires_grad_(True) for n, t in w.items()}
    logits, outputs = forward(config, w, torch.as_tensor(ids).long())
    loss = loss_of(logits, torch.as_tensor(labels).long())
    loss.backward()
    return (loss.item(), logits.detach(), [o.detach() for o in outputs],
            {n: t.grad for n, t in w.items()})


def schedule(step, steps, lr, warmup, min_ratio):
    """Linear warmup to `lr` over `warmup` steps, then cosine to lr * min_ratio at the last."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min((step - warmup) / max(steps - warmup - 1, 1), 1.0)
    low = lr * min_ratio
    return low + (lr - low) * (1 + math.cos(math.pi * t)) / 2


def train(config, w, id_batches, *, steps, lr, warmup, min_ratio, b1, b2, eps, weight_decay, clip):
    """AdamW (decoupled weight decay on every parameter, global-norm clipping, gradients of
    loss / n summed over the n micro-batches of each step) over `id_batches`, token ids of
    shape (n, B, L), one per step. A generator: yields (loss, gradient norm before clipping,
    weights) after every step, so that a caller compares each step's weights as they come
    and keeps none; the weights dict is the live one, which the next step overwrites.

    The labels are derived here from the ids by SPEC.md's rule, never taken from the caller.
    Rows longer than the model's context (L > seq_len) are cut to it after their labels are
    derived: a row cut from a longer stream keeps the stream's next token as the label of
    its last position (with seq_len 1, SPEC's rule alone would ignore every position)."""
    T = config["seq_len"]
    w = dict(w)  # each step replaces the tensors, never writes into them: the caller's stay
    m = {n: torch.zeros_like(t) for n, t in w.items()}
    v = {n: torch.zeros_like(t) for n, t in w.items()}
    for s, ids in enumerate(id_batches):
        x, y = torch.as_tensor(np.asarray(ids)).long()[..., :T], labels(ids)[..., :T]
        grads, loss = {}, 0.0
        for xm, ym in zip(x, y):
            micro, _, _, g = loss_and_grads(config, w, xm, ym)
            loss += micro / len(x)
            for n, gn in g.items():  # summed in micro-batch order
                grads[n] = grads[n] + gn / len(x) if n in grads else gn / len(x)
            del g
        total = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
        if clip and total > clip:
            grads = {n: g * (clip / total) for n, g in grads.items()}
        rate = schedule(s, steps, lr, warmup, min_ratio)
        t = s + 1
        for n in w:
            m[n] = b1 * m[n] + (1 - b1) * grads[n]
            v[n] = b2 * v[n] + (1 - b2) * grads[n] ** 2
            step = (m[n] / (1 - b1 ** t)) / (torch.sqrt(v[n] / (1 - b2 ** t)) + eps)
            w[n] = w[n] - rate * (step + weight_decay * w[n])
        del grads
        yield loss, total, w

