"""Flax against PyTorch from one set of weights: the figures behind `flax-gpt parity` and
the parity suite. Each function returns plain numpy, so callers decide what to assert.
"""

import functools
import importlib.metadata
import platform
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt import precision
from flax_gpt.core import weights
from flax_gpt.core.data import IGNORE_INDEX
from flax_gpt.core.hparams import TrainConfig
from flax_gpt.train import make_train_step, optimizer
from torch_reference import model as torch_model
from torch_reference.train import TrainStep

# float32 tolerances (SPEC.md, issue 3): any difference above these is a bug, not noise.
LOGITS_ATOL = 1e-5  # logits and every layer's output, max |diff|
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-5  # max |diff| / max |value|, per parameter tensor
TRAIN_LOSS_ATOL = 1e-5  # every step of a short AdamW run
TRAIN_PARAM_ATOL = 1e-4  # every parameter after it

# The key bias never changes the output: q . (k_j + b) = q . k_j + q . b adds the same number to
# a whole row of scores, and softmax ignores it. Its gradient is exactly zero in exact
# arithmetic, so both frameworks return rounding noise (~1e-13) whose relative difference is
# meaningless, and AdamW, which divides by sqrt(v), turns that noise into full-size steps of
# random sign. These tensors are judged by being zero, not by agreeing (parity_tests prove
# the invariance).
INERT_SUFFIX = ".mhma.k.bias"

# ReLU's derivative jumps at 0. An input within rounding of 0 (the two frameworks agree on
# pre-activations to ~1e-6) may land on opposite sides, and the gradients then truly differ
# by that unit's whole contribution: on the `small` preset, an input of 3e-8 made one row of
# fc1's gradient differ by 2e-5. Gradient and training parity give such kinks zero weight
# (see kink_free_labels) instead of loosening tolerances.
KINK_ATOL = LOGITS_ATOL


def is_inert(name):
    return name.endswith(INERT_SUFFIX)


@dataclass
class Row:
    quantity: str
    max_abs: float
    max_rel: float
    tolerance: float | None  # None: reported, not judged (bf16)
    passed: bool | None
    note: str = ""


def judged(quantity, diff_abs, diff_rel, tolerance, measure, note=""):
    return Row(quantity, float(diff_abs), float(diff_rel), tolerance,
               bool(measure <= tolerance), note)


def max_abs_rel(a, b):
    """max |a - b|, and the same divided by max |b| (b is the PyTorch reference).

    NaN in both at the same place is equal (the mean over zero kept labels is NaN in both
    frameworks); NaN in one only is an infinite difference.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    diff = np.where(both_nan, 0.0, np.abs(a - b))
    diff = float(np.max(np.nan_to_num(diff, nan=np.inf))) if a.size else 0.0
    scale = float(np.max(np.abs(np.where(both_nan, 0.0, b)))) if b.size else 0.0
    return diff, diff / scale if scale else diff


# ---- the two models from one set of weights ---------------------------------------------------

def build_pair(config, tensors, precision_name="highest", attention="explicit"):
    """(flax model, torch model), both in eval mode, holding exactly `tensors`."""
    fm = flax_model.GPT(config, rngs=nnx.Rngs(0), dtype=precision.flax_dtype(precision_name),
                        attention=attention)
    flax_model.set_canonical(fm, tensors)
    fm.eval()
    tm = torch_model.GPT(config, attention=attention)
    tm.load_state_dict({name: torch.from_numpy(np.array(t)) for name, t in tensors.items()})
    tm.eval()
    return fm, tm


def random_weights(config, seed=0):
    """Canonical tensors of a freshly initialised PyTorch model (the documented init)."""
    torch.manual_seed(seed)
    return torch_model.state_dict_to_canonical(torch_model.GPT(config))


def nudged(tensors):
    """Every weight moved one ulp toward +inf: the smallest change float32 can make, and the
    size of the rounding differences two correct implementations leave after one step."""
    return {name: np.nextafter(t, np.float32(np.inf)) for name, t in tensors.items()}


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
            weights.from_flax(fm.config, to_np(nnx.to_pure_dict(grads))))


def torch_outputs(tm, ids, labels, precision_name="highest"):
    tm.zero_grad(set_to_none=True)
    with precision.torch_autocast(precision_name):
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
    step = make_train_step(graphdef, tx, grad_accum=tc.grad_accum, dropout=bool(config.dropout))
    torch_step = TrainStep(tm, tc)
    key = jax.random.key(tc.seed)
    f_losses, t_losses = [], []
    for i, (x, y) in enumerate(batches):
        y = np.stack([kink_free_labels(tm, xm, ym)[0] for xm, ym in zip(x, y)])
        params, opt_state, metrics = step(params, opt_state, rest, jnp.asarray(x), jnp.asarray(y),
                                          jax.random.fold_in(key, i))
        f_losses.append(metrics["loss"])
        t_losses.append(torch_step(i, torch.from_numpy(x).long(), torch.from_numpy(y).long())["loss"])
    f_params = weights.from_flax(config, jax.tree.map(np.asarray, nnx.to_pure_dict(params)))
    return (np.asarray(jax.device_get(f_losses), np.float64),
            np.asarray([float(t) for t in t_losses]), f_params,
            torch_model.state_dict_to_canonical(tm))


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


def synthetic_batch(config, batch_size, seq_len, seed=0):
    """Random ids with SPEC labels; the last row's labels are all -100 when batch_size > 1
    (a fully ignored row must not change the mean)."""
    from flax_gpt.core.data import IGNORE_INDEX, make_batch

    rng = np.random.default_rng(seed)
    x, y = make_batch(rng.integers(0, config.vocab_size, (batch_size, seq_len)))
    if batch_size > 1:
        y[-1] = IGNORE_INDEX
    return x, y


def environment(precision_record):
    """Versions, device and precision: what every parity or benchmark result records."""
    import flax
    import optax

    return {
        **precision_record,
        "jax_device": str(jax.devices()[0].device_kind),
        "jax_backend": jax.default_backend(),
        "torch_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": importlib.metadata.version("jaxlib"),
                     "flax": flax.__version__, "optax": optax.__version__,
                     "torch": torch.__version__, "numpy": np.__version__},
        "machine": platform.machine(), "platform": platform.platform(),
    }


def default_train_config(precision_name="highest", attention="explicit"):
    """The short AdamW run of the parity suite: real hyperparameters, warmup then cosine."""
    return TrainConfig(steps=50, batch_size=4, lr=1e-3, warmup_steps=5, weight_decay=0.1,
                       grad_clip=1.0, precision=precision_name, attention=attention)
