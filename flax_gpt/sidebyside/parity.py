"""Flax against PyTorch from one set of weights: the figures behind `flax-gpt parity` and
the parity suite. `run` is the experiment; the other functions return plain numpy, so
callers decide what to assert.
"""

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_gpt import experiments
from flax_gpt import model as flax_model
from flax_gpt.core import weights
from flax_gpt.core.config import check_number
from flax_gpt.core.data import IGNORE_INDEX, TokenDataset
from flax_gpt.core.errors import FlaxGPTError
from flax_gpt.core.hparams import TrainConfig, check_seed
from flax_gpt.core.loop import Progress
from flax_gpt.core.progress import print_progress
from flax_gpt.core.streams import synthetic_batch
from flax_gpt.sidebyside.pair import (apply_precision, build_pair, build_torch, environment,
                                     random_weights)
from flax_gpt.core.precision import compute_dtype_name
from flax_gpt.sidebyside.tolerances import (DIRECT, MIN_EVIDENCE_SHARE, TRUTH_RATIO,
                                            TRUTH_WINDOW, Row, is_inert, judged, max_abs_rel,
                                            truth_floor, window_medians)
from flax_gpt.train import make_train_step, optimizer, shared_step
from torch_reference import model as torch_model
from torch_reference import precision as torch_precision
from torch_reference.train import TrainStep, global_norm


@functools.partial(jax.jit, static_argnums=0)
def _flax_forward(graphdef, params, rest, ids, labels):
    def loss_fn(params):
        model = nnx.merge(graphdef, params, rest)
        logits, hidden = model(ids, return_hidden=True)
        return flax_model.cross_entropy(logits, labels), (logits, hidden)

    (loss, (logits, hidden)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, hidden, grads


def _numpy(t):
    """A framework array as numpy, bf16 widened to float32, float64 kept: a copy, never a
    view (a parameter's .grad is accumulated into by the next backward)."""
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch_model.at_least_float32(t.dtype)).cpu().numpy().copy()
    return np.asarray(t.astype(flax_model.at_least_float32(t.dtype)))


def flax_outputs(fm, ids, labels):
    """loss, logits, {"embed", "layers"[, "final_norm"]}, canonical gradients: numpy (float32 or float64)."""
    graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
    loss, logits, hidden, grads = _flax_forward(graphdef, params, rest, jnp.asarray(ids),
                                                jnp.asarray(labels))
    to_np = functools.partial(jax.tree.map, _numpy)
    return float(loss), to_np(logits), to_np(hidden), flax_model.canonical(to_np(grads), fm.config)


def torch_outputs(tm, ids, labels, precision_name="highest"):
    """The same as flax_outputs, from the PyTorch model on whatever device it sits."""
    device = next(tm.parameters()).device
    tm.zero_grad(set_to_none=True)
    with torch_precision.autocast(precision_name, device.type):
        logits, hidden = tm(torch.from_numpy(np.asarray(ids)).long().to(device), return_hidden=True)
        loss = torch_model.cross_entropy(logits, torch.from_numpy(np.asarray(labels)).long().to(device))
    loss.backward()
    grads = {name: _numpy(p.grad) for name, p in tm.named_parameters()}
    hidden = {name: [_numpy(h) for h in value] if name == "layers" else _numpy(value)
              for name, value in hidden.items()}
    return loss.item(), _numpy(logits), hidden, grads


@functools.partial(jax.jit, static_argnums=0)
def _flax_output_grads(graphdef, state, ids, labels):
    model = nnx.merge(graphdef, state)
    x = model.embed(ids)

    def loss_fn(probes):  # GPT.__call__, with a zero added to each output to differentiate at
        h = x + probes[0]
        for layer, probe in zip(model.decoder.layers, probes[1:]):
            h = layer(h) + probe
        return flax_model.cross_entropy(model.head(model.decoder.norm(h)), labels)

    return jax.grad(loss_fn)([jnp.zeros_like(x)] * (1 + len(model.decoder.layers)))


def flax_output_grads(fm, ids, labels):
    """d loss / d (the embedding's output, each layer's output), numpy: where the backward
    pass stands after each layer, from the top down."""
    return [_numpy(g) for g in _flax_output_grads(*nnx.split(fm), jnp.asarray(ids), jnp.asarray(labels))]


def torch_output_grads(tm, ids, labels, precision_name="highest"):
    """The same as flax_output_grads, from the PyTorch model's own forward."""
    device = next(tm.parameters()).device
    with torch_precision.autocast(precision_name, device.type):
        logits, hidden = tm(torch.from_numpy(np.asarray(ids)).long().to(device), return_hidden=True)
        outputs = [hidden["embed"], *hidden["layers"]]
        for h in outputs:
            h.retain_grad()
        loss = torch_model.cross_entropy(logits, torch.from_numpy(np.asarray(labels)).long().to(device))
    loss.backward()
    tm.zero_grad(set_to_none=True)
    return [_numpy(h.grad) for h in outputs]


def torch_relu_inputs(tm, ids):
    """Every layer's fc1 output (the ReLU's input) in PyTorch's forward: (L, B, T, d_ff)."""
    inputs = []
    hooks = [layer.ffn.fc1.register_forward_hook(lambda module, args, out: inputs.append(out))
             for layer in tm.decoder.layers]
    try:
        with torch.no_grad():
            tm(torch.from_numpy(np.asarray(ids)).long().to(next(tm.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return np.stack([_numpy(z) for z in inputs])


@functools.partial(jax.jit, static_argnums=0)
def _flax_relu_inputs(graphdef, state, ids):
    model, inputs = nnx.merge(graphdef, state), []
    for layer in model.decoder.layers:  # each activation records its input as it runs
        layer.ffn.activation = functools.partial(_recorded, layer.ffn.activation, inputs)
    _, hidden = model(ids, return_hidden=True)
    return jnp.stack(inputs), hidden["layers"][-1]


def _recorded(activation, inputs, z):
    inputs.append(z)
    return activation(z)


def flax_relu_inputs(fm, ids):
    """Every layer's fc1 output in Flax's own forward, (L, B, T, d_ff), and the last layer's
    output (which a test holds equal to the model's, with no recording)."""
    inputs, last = _flax_relu_inputs(*nnx.split(fm), jnp.asarray(ids))
    return _numpy(inputs), _numpy(last)


def kink_free_labels(fm, tm, ids, labels, truth_model=None):
    """(`labels` with each row ignored from its first ReLU flip on, number of flips).

    A flip is a ReLU input on opposite sides of 0 in two of the forwards: Flax's, PyTorch's
    and, given `truth_model`, the float64 one's. It is the one place where two correct
    computations take different branches, and their gradients then truly differ by that
    unit's whole contribution (AdamW, which divides by sqrt(v), carries it on at full size).
    Under the causal mask position t feeds only the outputs of positions >= t, so ignoring
    those labels leaves the loss, and every gradient, free of the flip in all of them.
    """
    inputs = [flax_relu_inputs(fm, ids)[0], torch_relu_inputs(tm, ids)]
    if truth_model is not None:
        inputs.append(torch_relu_inputs(truth_model, ids))
    return labels_before_flips(labels, *inputs)


def labels_before_flips(labels, *inputs):
    """(`labels` with each row ignored from the first position where the runs' ReLU inputs,
    (L, B, T, F) each, do not all lie on one side of 0; the number of such inputs)."""
    positive = [z > 0 for z in inputs]
    flipped = np.any([p != positive[0] for p in positive[1:]], axis=0)  # (L, B, T, F)
    reached = np.cumsum(flipped.any(axis=(0, 3)), axis=1) > 0  # (B, T): at or after a flip
    return np.where(reached, IGNORE_INDEX, labels), int(flipped.sum())


def kept_share(masked, labels):
    """The share of `labels`' real labels that `masked` keeps (NaN when there are none)."""
    total = int(np.sum(labels != IGNORE_INDEX))
    return int(np.sum(masked != IGNORE_INDEX)) / total if total else float("nan")


# ---- rows ----------------------------------------------------------------------------------

def forward_pairs(f, t):
    """(name, flax, torch) for the embedding, every layer's output and the logits."""
    (_, f_logits, f_hidden, _), (_, t_logits, t_hidden, _) = f, t
    final = [("final norm output", f_hidden["final_norm"], t_hidden["final_norm"])
             ] if "final_norm" in f_hidden else []
    return [("embed output", f_hidden["embed"], t_hidden["embed"]),
            *[(f"layer {i} output", fl, tl) for i, (fl, tl) in
              enumerate(zip(f_hidden["layers"], t_hidden["layers"]))],
            *final, ("logits", f_logits, t_logits)]


def output_grad_row(f_out, t_out, tol, kept=None):
    """The gradients at the embedding's and every layer's output (flax_output_grads), each
    relative to its largest |value|: where a backward pass parts, read from the top down."""
    names = ["embed output", *[f"layer {i} output" for i in range(len(f_out) - 1)]]
    diffs = {n: max_abs_rel(f, t) for n, f, t in zip(names, f_out, t_out)}  # (abs, rel)
    per_layer = {n: rel for n, (_, rel) in diffs.items()}
    worst = max(names, key=lambda n: np.nan_to_num(per_layer[n], nan=np.inf))
    return judged(f"output gradients ({len(names)} outputs)", *diffs[worst], tol.grad_rel,
                  per_layer[worst], note=f"worst: {worst}{kept_note(kept)}", kept=kept,
                  figures={"per_layer_rel": per_layer, "kept_share": kept})


def unit_scaled(diff, rel):
    """What a direct row judges: the absolute difference where values are at most 1, the
    relative one above (min of the two). Rounding is relative: a loss of 10.8 sits where one
    float32 step is 9.5e-7, and an absolute 1e-6 failed correct pairs at GPT-2's vocabulary."""
    return min(diff, rel)


def kept_note(kept):
    return "" if kept is None else f"; {kept:.1%} of labels kept (labels after a ReLU flip masked)"


def direct_rows(f, t, tol, *, grads=None, kept=None):
    """Flax against PyTorch at one precision: forward rows, the loss, and the gradients
    (`grads`: (flax, torch) gradients, from kink-masked labels in float32, keeping `kept`)."""
    rows = []
    for name, fv, tv in forward_pairs(f, t):
        diff, rel = max_abs_rel(fv, tv)
        rows.append(judged(name, diff, rel, tol.layers, unit_scaled(diff, rel)))
    diff, rel = max_abs_rel(f[0], t[0])
    rows.append(judged("loss", diff, rel, tol.loss, unit_scaled(diff, rel)))
    f_grads, t_grads = grads or (f[3], t[3])
    live = [name for name in t_grads if not is_inert(name)]
    per_tensor = {name: max_abs_rel(f_grads[name], t_grads[name]) for name in live}
    worst = max(live, key=lambda name: np.nan_to_num(per_tensor[name][1], nan=np.inf))
    rows.append(judged(f"gradients ({len(live)} tensors)", *per_tensor[worst], tol.grad_rel,
                       per_tensor[worst][1], note=f"worst: {worst}{kept_note(kept)}", kept=kept,
                       figures={"per_tensor_rel": {n: r for n, (_, r) in per_tensor.items()},
                                "kept_share": kept}))
    largest = max(float(np.max(np.abs(t_grads[name]))) for name in live)
    inert = max(float(np.max(np.abs(g[name]))) for g in (f_grads, t_grads)
                for name in t_grads if is_inert(name))
    rel = inert / largest if largest else float("nan")
    rows.append(judged("key-bias gradients (exactly 0)", inert, rel, tol.grad_rel, rel,
                       note="|value| in either, relative to the largest gradient", kept=kept))
    return rows


def truth_row(quantity, f_err, t_err, compute_dtype, scale, note="", kept=None):
    """Flax's error against the truth, passing when <= TRUTH_RATIO x PyTorch's + a floor
    (inconclusive when measured on less than MIN_EVIDENCE_SHARE of the labels)."""
    bound = TRUTH_RATIO * t_err + truth_floor(compute_dtype, scale)
    return judged(f"{quantity} vs float64", f_err, f_err / t_err if t_err else float("inf"),
                  bound, f_err, note=note, kept=kept,
                  figures={"flax_error": f_err, "torch_error": t_err, "bound": bound})


def truth_rows(f, t, truth, compute_dtype, *, grads=None, kept=None):
    """Each framework's error against the float64 `truth` (torch_outputs of a float64
    model): every layer, the logits, the loss and every gradient (tensors_truth_row).
    `grads`: (flax, torch, truth) gradients from the same kink-masked labels, keeping `kept`
    (default: those of f, t and truth)."""
    rows = []
    for (name, fv, tv), (_, truth_v, _) in zip(forward_pairs(f, t), forward_pairs(truth, truth)):
        rows.append(truth_row(name, max_abs_rel(fv, truth_v)[0], max_abs_rel(tv, truth_v)[0],
                              compute_dtype, float(np.max(np.abs(truth_v)))))
    rows.append(truth_row("loss", abs(f[0] - truth[0]), abs(t[0] - truth[0]), compute_dtype,
                          abs(truth[0])))
    f_grads, t_grads, truth_grads = grads or (f[3], t[3], truth[3])
    live = [name for name in truth_grads if not is_inert(name)]
    rows.append(tensors_truth_row(f"gradients ({len(live)} tensors, relative)",
                                  {n: max_abs_rel(f_grads[n], truth_grads[n])[1] for n in live},
                                  {n: max_abs_rel(t_grads[n], truth_grads[n])[1] for n in live},
                                  compute_dtype, kept))
    return rows


def tensors_truth_row(quantity, f_errors, t_errors, compute_dtype, kept=None):
    """One judgement over many tensors: the root mean square of each framework's per-tensor
    relative errors against the truth, Flax's <= TRUTH_RATIO x PyTorch's + the floor.

    One ratio per tensor would be tens of chances for two equally accurate runs to differ
    by 2x (bf16 did, on one tensor of 48); the mean square concentrates them, and a bug in
    one tensor still moves it (a whole-size error in 1 of n adds 1/sqrt(n)). The note
    names the tensor whose ratio is worst: where to look."""
    def rms(errors):
        return float(np.sqrt(np.mean(np.square(list(errors.values())))))

    ratios = {n: f_errors[n] / t_errors[n] if t_errors[n] else float("inf") for n in f_errors}
    worst = max(ratios, key=lambda n: np.nan_to_num(ratios[n], nan=np.inf))
    row = truth_row(quantity, rms(f_errors), rms(t_errors), compute_dtype, 1.0, kept=kept,
                    note=f"root mean square over tensors; worst ratio: {worst} "
                         f"({f_errors[worst]:.2e} against {t_errors[worst]:.2e}){kept_note(kept)}")
    row.figures.update(flax_errors=f_errors, torch_errors=t_errors, worst_tensor=worst)
    return row


def bf16_rows(f, t, truth=None):
    """What a user of bf16 sees: next-token distributions and top-1 choices, Flax against
    PyTorch and (with `truth`) each against the float64 result."""
    def logp(logits):
        return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)

    def kl_and_top1(p, q):  # KL(p || q) per token, share of equal top-1 choices
        return (float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), axis=-1))),
                float(jnp.mean(jnp.argmax(p, -1) == jnp.argmax(q, -1))))

    kl, agree = kl_and_top1(logp(t[1]), logp(f[1]))
    rows = [Row("mean KL(torch || flax) per token", kl, kl, None, None),
            Row("top-1 agreement", agree, agree, None, None)]
    if truth is not None:
        for who, out in (("flax", f), ("torch", t)):
            kl, agree = kl_and_top1(logp(truth[1]), logp(out[1]))
            rows += [Row(f"mean KL(float64 || {who}) per token", kl, kl, None, None),
                     Row(f"top-1 agreement of {who} with float64", agree, agree, None, None)]
    return rows


def masks_kinks(config, precision_name, matmul_dtype):
    """Whether float32 comparisons of a ReLU model at this precision mask labels downstream
    of ReLU flips: where matmuls run in full float32 (highest, and default on a CPU), two
    correct runs differ by a few ulps and a flip is a rare event that decides a whole
    comparison. In TF32 and bf16 flips are everywhere in both frameworks alike, and errors
    are judged whole. GPT-2's GELU has no kink: nothing to mask."""
    return (config.activation == "relu" and precision_name != "float64"
            and matmul_dtype == "float32")


def compare_forward(fm, tm, ids, labels, precision_name="highest", truth_model=None,
                    matmul_dtype=None):
    """Rows for every layer's output, the logits, the loss and every gradient on one batch:
    judged directly in float64 and float32 `highest`, and each framework against
    `truth_model` (a float64 PyTorch model of the same weights) whenever it is given.

    Forward values and the loss are compared on all labels. In float32 (masks_kinks) the
    gradients of all three runs come from the same labels, masked downstream of every ReLU
    flip among them; the rows say what share they kept, and are inconclusive below
    MIN_EVIDENCE_SHARE. `matmul_dtype`: the ulp the truth judgement uses (default: the
    precision's compute dtype; "tfloat32" where TF32 ran)."""
    matmul_dtype = matmul_dtype or compute_dtype_name(precision_name)
    f = flax_outputs(fm, ids, labels)
    t = torch_outputs(tm, ids, labels, precision_name)
    truth = None if truth_model is None else torch_outputs(truth_model, ids, labels, "float64")
    grad_labels, kept, grads = labels, None, (f[3], t[3])
    if masks_kinks(fm.config, precision_name, matmul_dtype):
        grad_labels, _ = kink_free_labels(fm, tm, ids, labels, truth_model)
        kept = kept_share(grad_labels, labels)
        grads = (flax_outputs(fm, ids, grad_labels)[3],
                 torch_outputs(tm, ids, grad_labels, precision_name)[3])
    rows = []
    if precision_name in DIRECT:  # float64 and highest: Flax against PyTorch, judged
        rows += direct_rows(f, t, DIRECT[precision_name], grads=grads, kept=kept)
        rows.append(output_grad_row(flax_output_grads(fm, ids, grad_labels),
                                    torch_output_grads(tm, ids, grad_labels, precision_name),
                                    DIRECT[precision_name], kept))
    else:  # default and bf16: Flax against PyTorch is reported, not judged
        rows += [Row(f"{name}: flax - torch", *max_abs_rel(fv, tv), None, None)
                 for name, fv, tv in forward_pairs(f, t)[-1:]]
        rows.append(Row("loss: flax - torch", *max_abs_rel(f[0], t[0]), None, None))
    if precision_name == "bf16":
        rows += bf16_rows(f, t, truth)
    if truth is not None:
        truth_grads = truth[3] if kept is None else torch_outputs(truth_model, ids, grad_labels, "float64")[3]
        rows += truth_rows(f, t, truth, matmul_dtype, grads=(*grads, truth_grads), kept=kept)
    return rows


# ---- training --------------------------------------------------------------------------------

class Trajectory(NamedTuple):
    """One AdamW run: per-step losses and global gradient norms (before the clip), and the
    canonical parameters after the last step."""

    losses: np.ndarray
    grad_norms: np.ndarray
    params: dict


class TrainingRun(NamedTuple):
    """Flax and PyTorch (and the float64 truth, when it ran beside them) trained in lockstep
    on the same labels; `kept`: the share of labels each step kept (empty when nothing was
    masked)."""

    flax: Trajectory
    torch: Trajectory
    truth: Trajectory | None
    kept: list


def train_both(config, tensors, batches, tc, *, torch_device="cpu", truth=False,
               mask_kinks=False, on_step=None):
    """Train both frameworks from `tensors` on the same `batches` (a list of (x, y) with
    shape (grad_accum, B, T)) in lockstep, and with `truth` a float64 PyTorch run beside them.

    With `mask_kinks` (float32), each step's labels are masked downstream of every ReLU flip
    among the runs' own forwards at that step (kink_free_labels), the same labels for all of
    them, and the run stops before a step that would keep less than MIN_EVIDENCE_SHARE of
    its labels (a step that keeps none has a NaN loss). `on_step(i, flax parameters, torch
    parameters)` (canonical tensors) is called after each optimizer step when given.
    Returns a TrainingRun."""
    fm, tm = build_pair(config, tensors, tc.precision, tc.attention, torch_device=torch_device)
    fm.train()
    graphdef, params, rest = nnx.split(fm, nnx.Param, ...)
    tx = optimizer(tc)
    opt_state = tx.init(params)
    # one compilation for every run of this config and these hyperparameters (the sweeps)
    step = shared_step(("parity", config, tc), lambda: make_train_step(graphdef, tx))
    torch_steps = [TrainStep(tm, tc, device=torch_device)]
    if truth:
        truth_model = build_torch(config, tensors, "float64", tc.attention, torch_device=torch_device)
        torch_steps.append(TrainStep(truth_model, tc.replace(precision="float64"), device=torch_device))
    key = jax.random.key(tc.seed)
    f_metrics, t_metrics, kept = [], [[] for _ in torch_steps], []
    shown = Progress(len(batches))  # a bar on a terminal, plain lines in a log
    for i, (x, y) in enumerate(batches):
        if mask_kinks:
            current = nnx.merge(graphdef, params, rest)
            masked = np.stack([kink_free_labels(current, tm, xm, ym, truth_model if truth else None)[0]
                               for xm, ym in zip(x, y)])
            kept.append(kept_share(masked, y))
            if not kept[-1] >= MIN_EVIDENCE_SHARE:
                break
            y = masked
        params, opt_state, metrics = step(params, opt_state, rest, jnp.asarray(x), jnp.asarray(y),
                                          jax.random.fold_in(key, i))
        f_metrics.append(metrics)
        xt, yt = (torch.from_numpy(a).long().to(torch_device) for a in (x, y))
        for torch_step, out in zip(torch_steps, t_metrics):
            out.append(torch_step(i, xt, yt))
        if on_step:
            on_step(i, flax_model.canonical(params, config), torch_model.canonical(tm))
        shown.update(i + 1)
    shown.close()
    flax_run = trajectory(jax.device_get(f_metrics), flax_model.canonical(params, config))
    torch_runs = [trajectory([{k: float(v) for k, v in m.items()} for m in out],
                             torch_model.canonical(ts.model)) for ts, out in zip(torch_steps, t_metrics)]
    return TrainingRun(flax_run, torch_runs[0], torch_runs[1] if truth else None, kept)


def trajectory(metrics, params):
    return Trajectory(np.asarray([m["loss"] for m in metrics], np.float64),
                      np.asarray([m["grad_norm"] for m in metrics], np.float64), params)


def probe_clip(config, tensors, batches, *, torch_device="cpu"):
    """A global-norm clip that the parity run's first steps straddle: the median of the
    gradient norms that `tensors` have on each of `batches` (float64, PyTorch), so that the
    clipping branch of both trainers runs on some steps and not on others."""
    tm = build_torch(config, tensors, "float64", torch_device=torch_device)
    norms = []
    for x, y in batches:
        tm.zero_grad(set_to_none=True)
        for xm, ym in zip(x, y):  # accumulated as the trainers do: loss / grad_accum per micro-batch
            ids, labels = (torch.from_numpy(a).long().to(torch_device) for a in (xm, ym))
            (torch_model.cross_entropy(tm(ids), labels) / len(x)).backward()
        norms.append(float(global_norm([p.grad for p in tm.parameters()])))
    return float(np.median(norms))


def first_step_above(diff, tolerance):
    """1-based step of the first |diff| above tolerance (or NaN), or None."""
    above = np.nonzero(~(np.asarray(diff) <= tolerance))[0]
    return int(above[0]) + 1 if len(above) else None


def clipped_note(run, clip):
    """How often each framework's clipping branch ran: 'clipped on a/N (flax), b/N (torch)'."""
    if not clip:
        return "no clipping"
    return "clipped on " + ", ".join(f"{int(np.sum(t.grad_norms > clip))}/{len(t.grad_norms)} steps ({who})"
                                     for who, t in (("flax", run.flax), ("torch", run.torch)))


def direct_training_rows(run, tol, steps, clip):
    """Each step's loss and the final parameters, Flax against PyTorch: judged on the steps
    the run made (a kink-masked run stops where the evidence runs thin)."""
    f, t = run.flax, run.torch
    done = len(f.losses)
    diff = np.abs(f.losses - t.losses)
    kept = evidence(run, steps)
    loss_diff, loss_rel = max_abs_rel(f.losses, t.losses)
    rows = [judged(f"train loss, each of {steps} AdamW steps", loss_diff, loss_rel,
                   tol.train_loss, unit_scaled(loss_diff, loss_rel) if done else float("nan"),
                   note=training_note(run, steps, clip), kept=kept,
                   figures={"flax": f.losses.tolist(), "torch": t.losses.tolist(),
                            "kept_share": run.kept, "flax_grad_norms": f.grad_norms.tolist(),
                            "torch_grad_norms": t.grad_norms.tolist(),
                            "first_step_above": first_step_above(diff, tol.train_loss)})]
    live = [name for name in t.params if not is_inert(name)]
    per_tensor = {name: max_abs_rel(f.params[name], t.params[name]) for name in live}
    worst = max(live, key=lambda name: np.nan_to_num(unit_scaled(*per_tensor[name]), nan=np.inf))
    rows.append(judged(f"parameters after {done} steps", *per_tensor[worst], tol.train_params,
                       unit_scaled(*per_tensor[worst]), note=f"worst: {worst}", kept=kept,
                       figures={"per_tensor_abs": {n: a for n, (a, _) in per_tensor.items()},
                                "worst_tensor": worst}))
    inert = [name for name in t.params if is_inert(name)]
    rows.append(Row("key biases after training (no effect on the loss)",
                    *max(max_abs_rel(f.params[name], t.params[name]) for name in inert),
                    None, None, note="Adam steps on a gradient of rounding noise"))
    return rows


def evidence(run, steps):
    """The share of labels a training comparison rests on: None when nothing was masked,
    the smallest share of a step made, or (no step made) the share that stopped it."""
    if not run.kept:
        return None
    return min(run.kept[:len(run.flax.losses)]) if len(run.flax.losses) else run.kept[-1]


def training_note(run, steps, clip):
    """How often each framework clipped, the kept share, and where a masked run stopped."""
    note = clipped_note(run, clip)
    if run.kept:
        note += (f"; kept share of labels per step: min {min(run.kept):.1%}, mean "
                 f"{np.mean(run.kept):.1%} (labels after a ReLU flip masked)")
    done = len(run.flax.losses)
    if done < steps:
        note += f"; compared on steps 1-{done} of {steps}: step {done + 1} kept {run.kept[-1]:.1%}"
    return note


def truth_training_rows(run, steps, clip, matmul_dtype):
    """Each framework's run against the float64 run on the same labels: the loss in medians
    of TRUTH_WINDOW-step windows, and the parameters after the last step (tensors_truth_row)."""
    truth = run.truth
    done = len(truth.losses)
    f_win = window_medians(np.abs(run.flax.losses - truth.losses))
    t_win = window_medians(np.abs(run.torch.losses - truth.losses))
    bounds = TRUTH_RATIO * t_win + truth_floor(matmul_dtype, float(np.max(np.abs(truth.losses),
                                                                          initial=0.0)))
    excess = f_win - bounds  # NaN first: a NaN window fails, and is the one shown
    worst = int(np.argmax(np.where(np.isnan(excess), np.inf, excess))) if done else 0
    above = first_step_above(excess, 0)  # 1-based window
    kept = evidence(run, steps)
    nan = float("nan")
    rows = [judged(f"train loss vs float64, medians of {TRUTH_WINDOW}-step windows",
                   f_win[worst] if done else nan,
                   f_win[worst] / t_win[worst] if done and t_win[worst] else float("inf"),
                   float(bounds[worst]) if done else nan, f_win[worst] if done else nan,
                   note=(f"tightest window: steps {worst * TRUTH_WINDOW + 1}-"
                         f"{min((worst + 1) * TRUTH_WINDOW, done)}; " + training_note(run, steps, clip)),
                   kept=kept,
                   figures={"flax_window_errors": f_win.tolist(), "torch_window_errors": t_win.tolist(),
                            "window_bounds": bounds.tolist(), "truth": truth.losses.tolist(),
                            "first_step_above": above and (above - 1) * TRUTH_WINDOW + 1})]

    live = [name for name in truth.params if not is_inert(name)]
    rows.append(tensors_truth_row(
        f"parameters after {done} steps (relative)",
        {n: max_abs_rel(run.flax.params[n], truth.params[n])[1] for n in live},
        {n: max_abs_rel(run.torch.params[n], truth.params[n])[1] for n in live}, matmul_dtype, kept))
    return rows


def compare_training(config, tensors, batches, tc, *, truth=True, torch_device="cpu",
                     matmul_dtype=None):
    """Rows for each step's loss and the final parameters. float64: Flax against PyTorch,
    nothing masked. Otherwise both frameworks train in lockstep with the float64 truth
    (`truth`) on the same labels (kink-masked among all three where masks_kinks says so):
    Flax against PyTorch directly in `highest` (judged) or reported, and each framework
    against the truth."""
    matmul_dtype = matmul_dtype or compute_dtype_name(tc.precision)
    steps = len(batches)
    run = train_both(config, tensors, batches, tc, torch_device=torch_device,
                     truth=truth and tc.precision != "float64",
                     mask_kinks=masks_kinks(config, tc.precision, matmul_dtype))
    if tc.precision in DIRECT:
        rows = direct_training_rows(run, DIRECT[tc.precision], steps, tc.grad_clip)
    else:  # default and bf16: Flax against PyTorch is reported, not judged
        rows = [Row(f"train loss, {steps} AdamW steps: flax - torch",
                    *max_abs_rel(run.flax.losses, run.torch.losses), None, None,
                    note=training_note(run, steps, tc.grad_clip))]
    if run.truth is not None:
        rows += truth_training_rows(run, steps, tc.grad_clip, matmul_dtype)
    return rows


# probe_clip reads the gradient norms of this many first steps: an even number, so that the
# median lies between two norms and is no step's own (there both frameworks would sit on the
# branch point, and rounding would pick their branches)
CLIP_PROBE_STEPS = 6


def default_train_config(precision_name="highest", attention="explicit"):
    """The short AdamW run of the parity suite: real hyperparameters, warmup then cosine,
    two micro-batches a step (run() sets the clip with probe_clip)."""
    return TrainConfig(steps=50, batch_size=4, grad_accum=2, lr=1e-3, warmup_steps=5,
                       weight_decay=0.1, grad_clip=1.0, precision=precision_name,
                       attention=attention)


def parity_batches(config, dataset, batch_size, seq_len, n, seed, grad_accum=1):
    """n batches of shape (grad_accum, B, T): from the dataset (shuffled rows) or random tokens."""
    if dataset is None:
        micro = [synthetic_batch(config.vocab_size, batch_size, seq_len, seed + i, ignored_row=True)
                 for i in range(n * grad_accum)]
    else:
        micro, epoch = [], 0
        while len(micro) < n * grad_accum:
            micro += list(dataset.batches("train", batch_size, seq_len, shuffle=True, seed=seed,
                                          epoch=epoch))
            epoch += 1
    return [tuple(np.stack(part) for part in zip(*micro[i:i + grad_accum]))  # (grad_accum, B, T)
            for i in range(0, n * grad_accum, grad_accum)]


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
    train_config: dict = None  # the AdamW run's hyperparameters, the probed clip included

    @property
    def failed(self):
        return [r.quantity for r in self.rows if r.passed is False]

    @property
    def inconclusive(self):
        return [r.quantity for r in self.rows if r.inconclusive]

    @property
    def passed(self):
        """No row failed, and at least one was judged and passed: nothing passes on nothing."""
        return not self.failed and any(r.passed for r in self.rows)

    @property
    def divergence(self):
        """Where the two part, when they do: the first layer (from the embedding up) whose
        output fails (forward); the first output from the top whose gradient fails
        (backward); the first parameter tensor from the top whose gradient fails
        (gradient_tensor; against the truth, the tensor of the worst ratio); the first
        training step whose loss fails (training_step; against the truth, the first step of
        the first window that fails: training_window); the parameter tensor furthest apart
        after training, when the parameters fail (trained_tensor)."""
        out = {}
        forward = [r for r in self.rows if r.quantity.startswith(("embed output", "layer ", "logits"))]
        first = next((r.quantity for r in forward if r.passed is False), None)
        if first:
            out["forward"] = first.removesuffix(" vs float64")
        for r in self.rows:
            if r.passed is not False:
                continue
            for figure, key in (("per_layer_rel", "backward"), ("per_tensor_rel", "gradient_tensor")):
                per = r.figures.get(figure)
                if per:
                    top = [n for n in reversed(list(per)) if not per[n] <= r.tolerance]
                    if top:
                        out[key] = top[0]
            if r.figures.get("first_step_above"):  # the direct row's step before the truth's window
                key = "training_window" if "window_bounds" in r.figures else "training_step"
                out.setdefault(key, r.figures["first_step_above"])
            if "worst_tensor" in r.figures:  # a many-tensor row: the direct ones come first
                key = "trained_tensor" if r.quantity.startswith("parameters") else "gradient_tensor"
                out.setdefault(key, r.figures["worst_tensor"])
        return out

    def to_dict(self):
        return {"config": self.config, "attention": self.attention, "batch_size": self.batch_size,
                "train_steps": self.train_steps, "data": self.data,
                "train_config": self.train_config,
                "rows": [dataclasses.asdict(r) for r in self.rows], "passed": self.passed,
                "inconclusive": self.inconclusive, "divergence": self.divergence,
                **self.environment}


def run(config=None, *, weights_path=None, data=None, precision="highest", attention="explicit",
        batch_size=4, train_steps=50, lr=None, seed=0, torch_device=None, progress=print_progress):
    """Compare Flax and PyTorch from one set of weights: every layer's output, the logits, the
    loss and every gradient on one batch, then `train_steps` AdamW steps on the same batches.

    float64 and float32 `highest` are judged Flax against PyTorch; every precision but
    float64 is also judged against a float64 PyTorch run from the same weights, batches and
    labels (the verdict: Flax as accurate as PyTorch). The AdamW run exercises every branch
    of both trainers' step: warmup then cosine decay, two micro-batches a step, and a clip
    that some steps exceed and others do not (probe_clip). The weights come from
    `weights_path` (a canonical file) or a seeded PyTorch init of `config`; batches from
    the dataset folder `data` or random tokens. PyTorch runs on `torch_device` (default:
    cuda when available). Returns a ParityResult.
    """
    if (config is None) == (weights_path is None):
        raise FlaxGPTError("parity takes a model config or a weights file (which carries its "
                           "config), not both or neither")
    check_number("train_steps", train_steps, low=0, integer=True)
    check_number("batch_size", batch_size, low=1, integer=True)
    check_seed(seed)
    # every setting checked before anything is built: an --lr of NaN must not wait for the
    # forward comparison to be refused
    tc = default_train_config(precision, attention).replace(
        steps=max(train_steps, 1), batch_size=batch_size, seed=seed, lr=lr)
    torch_device = torch_device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = TokenDataset.load(data) if data else None
    if weights_path:
        config, tensors = weights.load(weights_path)
        # SPEC: parity runs use dropout 0 (the frameworks draw different masks); a file's own
        # rate, e.g. an imported GPT-2's 0.1, is for training it, not for comparing
        config = config.replace(dropout=0.0)
        if dataset and dataset.vocab_size != config.vocab_size:
            raise FlaxGPTError(f"--data has {dataset.vocab_size} tokens but the weights' "
                               f"vocabulary is {config.vocab_size}: use the dataset they were "
                               f"trained on")
    elif dataset:
        config = config.replace(vocab_size=dataset.vocab_size)
    if dataset:
        dataset.check_batches("train", batch_size, config.seq_len)
    # the models train at once: the Flax one where JAX computes, PyTorch's and (below
    # float64) PyTorch's float64 truth on torch_device
    experiments.check_memory(config, batch_size, "parity", training=True, attention=attention,
                             precision=precision,
                             places=[("flax", None), ("torch", torch_device),
                                     *([("torch", torch_device, "float64")] if precision != "float64" else [])])
    if not weights_path:
        tensors = random_weights(config, seed)
    batches = parity_batches(config, dataset, batch_size, config.seq_len, max(train_steps, 1), seed,
                             tc.grad_accum)
    x, y = batches[0]
    record = apply_precision(precision)  # before this precision's models are built
    truth_model = None
    if precision != "float64":  # PyTorch in float64 needs no switch of JAX's
        truth_model = build_torch(config, tensors, "float64", attention, torch_device=torch_device)
    if train_steps:
        progress("probing the clip: gradient norms of the first steps, float64")
        tc = tc.replace(grad_clip=probe_clip(config, tensors, batches[:CLIP_PROBE_STEPS],
                                             torch_device=torch_device))
    progress(f"{precision}: forward and backward" + ("" if truth_model is None else ", and the float64 truth"))
    fm, tm = build_pair(config, tensors, precision, attention, torch_device=torch_device)
    rows = compare_forward(fm, tm, x[0], y[0], precision, truth_model=truth_model,
                           matmul_dtype=record["matmul_dtype"])
    if train_steps:
        progress(f"{precision}: {train_steps} AdamW steps in both frameworks"
                 + ("" if truth_model is None else " and the float64 truth, in lockstep"))
        rows += compare_training(config, tensors, batches[:train_steps], tc, torch_device=torch_device,
                                 matmul_dtype=record["matmul_dtype"])
    return ParityResult(config.to_dict(), attention, batch_size, train_steps,
                        str(Path(data)) if data else "random", rows,
                        environment(record, torch_device=torch_device),
                        tc.to_dict() if train_steps else None)
