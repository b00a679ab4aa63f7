"""Flax against PyTorch from one set of weights: the figures behind `flax-gpt parity` and
the parity suite. `run` is the experiment; the other functions return plain numpy, so
callers decide what to assert.
"""

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt.core import weights
from flax_gpt.core.data import IGNORE_INDEX, TokenDataset
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.hparams import TrainConfig
from flax_gpt.core.streams import synthetic_batch
from flax_gpt.sidebyside.pair import apply_precision, build_pair, environment, random_weights
from flax_gpt.sidebyside.tolerances import (GRAD_RTOL, KINK_ATOL, LOGITS_ATOL, LOSS_ATOL,
                                            TRAIN_LOSS_ATOL, TRAIN_PARAM_ATOL, Row, is_inert,
                                            judged, max_abs_rel)
from flax_gpt.train import make_train_step, optimizer
from torch_reference import model as torch_model
from torch_reference import precision as torch_precision
from torch_reference.train import TrainStep


@functools.partial(jax.jit, static_argnums=0)
def _flax_forward(graphdef, params, rest, ids, labels):
    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        logits, hidden = model(ids, return_hidden=True)
        return flax_model.cross_entropy(logits, labels), (logits, hidden)

    (loss, (logits, hidden)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, hidden, grads


def flax_outputs(fm, ids, labels):
    """loss, logits, {"embed", "layers"}, canonical gradients: all float32 numpy."""
    graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
    loss, logits, hidden, grads = _flax_forward(graphdef, params, rest, jnp.asarray(ids),
                                                jnp.asarray(labels))
    to_np = functools.partial(jax.tree.map, lambda t: np.asarray(t, np.float32))
    return (float(loss), to_np(logits), to_np(hidden),
            flax_model.canonical(grads, fm.config))


def torch_outputs(tm, ids, labels, precision_name="highest"):
    tm.zero_grad(set_to_none=True)
    with torch_precision.autocast(precision_name):
        logits, hidden = tm(torch.from_numpy(np.asarray(ids)).long(), return_hidden=True)
        loss = torch_model.cross_entropy(logits, torch.from_numpy(np.asarray(labels)).long())
    loss.backward()

    def to_np(t):
        return t.detach().float().numpy()

    grads = {name: to_np(p.grad) for name, p in tm.named_parameters()}
    hidden = {"embed": to_np(hidden["embed"]), "layers": [to_np(h) for h in hidden["layers"]]}
    return float(loss), to_np(logits), hidden, grads


def relu_inputs(tm, ids):
    """Every layer's fc1 output (the ReLU's input) in PyTorch's forward: (L, B, T, d_ff)."""
    inputs = []
    hooks = [layer.ffn.fc1.register_forward_hook(lambda module, args, out: inputs.append(out))
             for layer in tm.decoder.layers]
    try:
        with torch.no_grad():
            tm(torch.from_numpy(np.asarray(ids)).long())
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack(inputs).numpy()


def kink_free_labels(tm, ids, labels):
    """(`labels` with each row ignored from its first ReLU kink on, number of kinks).

    A kink is a ReLU input within KINK_ATOL of 0 in PyTorch's forward. Under the causal mask
    position t feeds only the outputs of positions >= t, so ignoring those labels leaves the
    loss, and hence every gradient, independent of which side of 0 each framework rounded to.
    """
    near = np.abs(relu_inputs(tm, ids)) < KINK_ATOL  # (L, B, T, d_ff)
    reached = np.cumsum(near.any(axis=(0, 3)), axis=1) > 0  # (B, T): at or after a kink
    return np.where(reached, IGNORE_INDEX, labels), int(near.sum())


# ---- comparisons ------------------------------------------------------------------------------

def compare_forward(fm, tm, ids, labels, precision_name="highest"):
    """Rows for logits, every layer's output, the loss and every gradient."""
    f_loss, f_logits, f_hidden, f_grads = flax_outputs(fm, ids, labels)
    t_loss, t_logits, t_hidden, t_grads = torch_outputs(tm, ids, labels, precision_name)
    if precision_name == "bf16":
        return bf16_rows(f_loss, f_logits, t_loss, t_logits)
    rows = []
    for name, f, t in [("embed output", f_hidden["embed"], t_hidden["embed"]),
                       *[(f"layer {i} output", f, t) for i, (f, t) in
                         enumerate(zip(f_hidden["layers"], t_hidden["layers"]))],
                       ("logits", f_logits, t_logits)]:
        diff, rel = max_abs_rel(f, t)
        rows.append(judged(name, diff, rel, LOGITS_ATOL, diff))
    diff, rel = max_abs_rel(f_loss, t_loss)
    rows.append(judged("loss", diff, rel, LOSS_ATOL, diff))
    grad_labels, kinks = kink_free_labels(tm, ids, labels)
    note = ""
    if kinks:
        f_grads = flax_outputs(fm, ids, grad_labels)[3]
        t_grads = torch_outputs(tm, ids, grad_labels, precision_name)[3]
        kept = int(np.sum(grad_labels != IGNORE_INDEX))
        note = f"; {kinks} ReLU kinks: {kept} of {int(np.sum(labels != IGNORE_INDEX))} labels kept"
    live = [name for name in t_grads if not is_inert(name)]
    worst = max(((name, *max_abs_rel(f_grads[name], t_grads[name])) for name in live),
                key=lambda item: item[2])
    rows.append(judged(f"gradients ({len(live)} tensors)", worst[1], worst[2], GRAD_RTOL,
                       worst[2], note=f"worst: {worst[0]}{note}"))
    largest = max(float(np.max(np.abs(t_grads[name]))) for name in live)
    inert = max(float(np.max(np.abs(g[name]))) for g in (f_grads, t_grads)
                for name in t_grads if is_inert(name))
    rel = inert / largest if largest else inert
    rows.append(judged("key-bias gradients (exactly 0)", inert, rel, GRAD_RTOL, rel,
                       note="|value| in either, relative to the largest gradient"))
    return rows


def bf16_rows(f_loss, f_logits, t_loss, t_logits):
    """bf16 is judged by what a user sees: loss, next-token distributions, top-1 choices."""
    f = jax.nn.log_softmax(jnp.asarray(f_logits, jnp.float32), axis=-1)
    t = jax.nn.log_softmax(jnp.asarray(t_logits, jnp.float32), axis=-1)
    kl = float(jnp.mean(jnp.sum(jnp.exp(t) * (t - f), axis=-1)))  # KL(torch || flax)
    agree = float(jnp.mean(jnp.argmax(f, -1) == jnp.argmax(t, -1)))
    loss_diff, loss_rel = max_abs_rel(f_loss, t_loss)
    return [Row("loss", loss_diff, loss_rel, None, None),
            Row("mean KL(torch || flax) per token", kl, kl, None, None),
            Row("top-1 agreement", agree, agree, None, None)]


def train_both(config, tensors, batches, tc):
    """Train both frameworks from `tensors` on the same `batches` (a list of (x, y) with
    shape (grad_accum, B, T)), each step's labels made kink-free; return per-step losses and
    the final canonical parameters."""
    fm, tm = build_pair(config, tensors, tc.precision, tc.attention)
    fm.train()
    graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
    tx = optimizer(tc)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    torch_step = TrainStep(tm, tc)
    key = jax.random.key(tc.seed)
    f_losses, t_losses = [], []
    for i, (x, y) in enumerate(batches):
        y = np.stack([kink_free_labels(tm, xm, ym)[0] for xm, ym in zip(x, y)])
        params, opt_state, metrics = step(params, opt_state, rest, jnp.asarray(x), jnp.asarray(y),
                                          jax.random.fold_in(key, i))
        f_losses.append(metrics["loss"])
        t_losses.append(torch_step(i, torch.from_numpy(x).long(), torch.from_numpy(y).long())["loss"])
    return (np.asarray(jax.device_get(f_losses), np.float64),
            np.asarray([float(t) for t in t_losses]), flax_model.canonical(params, config),
            torch_model.canonical(tm))


def compare_training(config, tensors, batches, tc):
    f_losses, t_losses, f_params, t_params = train_both(config, tensors, batches, tc)
    diff, rel = max_abs_rel(f_losses, t_losses)
    steps = len(batches)
    if tc.precision == "bf16":
        return [Row(f"train loss, {steps} AdamW steps", diff, rel, None, None)]
    rows = [judged(f"train loss, each of {steps} AdamW steps", diff, rel, TRAIN_LOSS_ATOL, diff)]
    live = [name for name in t_params if not is_inert(name)]
    worst = max(((name, *max_abs_rel(f_params[name], t_params[name])) for name in live),
                key=lambda item: item[1])
    rows.append(judged(f"parameters after {steps} steps", worst[1], worst[2], TRAIN_PARAM_ATOL,
                       worst[1], note=f"worst: {worst[0]}"))
    inert = [name for name in t_params if is_inert(name)]
    diff, rel = max(max_abs_rel(f_params[name], t_params[name]) for name in inert)
    rows.append(Row("key biases after training (no effect on the loss)", diff, rel, None, None,
                    note="Adam steps on a gradient of rounding noise"))
    return rows


def default_train_config(precision_name="highest", attention="explicit"):
    """The short AdamW run of the parity suite: real hyperparameters, warmup then cosine."""
    return TrainConfig(steps=50, batch_size=4, lr=1e-3, warmup_steps=5, weight_decay=0.1,
                       grad_clip=1.0, precision=precision_name, attention=attention)


def parity_batches(config, dataset, batch_size, seq_len, n, seed):
    """n batches of shape (1, B, T): from the dataset (shuffled rows) or random tokens."""
    if dataset is None:
        return [tuple(a[None] for a in synthetic_batch(config.vocab_size, batch_size, seq_len,
                                                       seed + i, ignored_row=True))
                for i in range(n)]
    out, epoch = [], 0
    while len(out) < n:
        out += [(x[None], y[None]) for x, y in
                dataset.batches("train", batch_size, seq_len, shuffle=True, seed=seed, epoch=epoch)]
        epoch += 1
    return out[:n]


# ---- the experiment ------------------------------------------------------------------------

@dataclass
class ParityResult:
    """What `flax-gpt parity` prints and `--json` writes."""

    config: dict
    attention: str
    batch_size: int
    train_steps: int
    data: str
    rows: list  # of Row
    environment: dict  # versions, devices, precision: merged into the JSON's top level

    @property
    def failed(self):
        return [r.quantity for r in self.rows if r.passed is False]

    @property
    def passed(self):
        return not self.failed

    def to_dict(self):
        return {"config": self.config, "attention": self.attention, "batch_size": self.batch_size,
                "train_steps": self.train_steps, "data": self.data,
                "rows": [dataclasses.asdict(r) for r in self.rows], "passed": self.passed,
                **self.environment}


def run(config=None, *, weights_path=None, data=None, precision="highest", attention="explicit",
        batch_size=4, train_steps=50, lr=None, seed=0):
    """Compare Flax and PyTorch from one set of weights: every layer's output, the logits, the
    loss and every gradient on one batch, then `train_steps` AdamW steps on the same batches.

    The weights come from `weights_path` (a canonical file) or a seeded PyTorch init of
    `config`; batches from the dataset folder `data` or random tokens. Returns a ParityResult.
    """
    record = apply_precision(precision)  # before the frameworks build anything
    dataset = TokenDataset.load(data) if data else None
    if weights_path:
        config, tensors = weights.load(weights_path)
        if dataset and dataset.vocab_size != config.vocab_size:
            raise FlaxGPTError(f"--data has {dataset.vocab_size} tokens but the weights' "
                               f"vocabulary is {config.vocab_size}: use the dataset they were "
                               f"trained on")
    else:
        if dataset:
            config = config.replace(vocab_size=dataset.vocab_size)
        tensors = random_weights(config, seed)
    batches = parity_batches(config, dataset, batch_size, config.seq_len, max(train_steps, 1), seed)
    fm, tm = build_pair(config, tensors, precision, attention)
    x, y = batches[0]
    rows = compare_forward(fm, tm, x[0], y[0], precision)
    if train_steps:
        tc = default_train_config(precision, attention).replace(
            steps=train_steps, batch_size=batch_size, seed=seed, lr=lr)
        rows += compare_training(config, tensors, batches[:train_steps], tc)
    return ParityResult(config.to_dict(), attention, batch_size, train_steps,
                        str(Path(data)) if data else "random", rows, environment(record))
