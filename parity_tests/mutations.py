"""The mutation catalogue (issue 20, section 3): every planted bug caught, and located.

Each entry of MUTATIONS patches one bug into one framework (or into the core both share)
with parity_tests/detector.py's Patch, runs the comparison that should see it, and records
whether it failed and whether its divergence names the right place:

- forward bugs: `parity.run` without training (every layer, the logits, the loss, every
  gradient and the gradients at every layer's output);
- training bugs: `parity.run` with TRAIN_STEPS AdamW steps (two micro-batches a step, a
  probed clip that some steps exceed), whose forward rows must pass;
- decode bugs: `decoding.compare_generation` (the key/value cache is used nowhere else),
  beside a forward parity run that must pass;
- shared bugs (code both frameworks take from flax_gpt/core): invisible to Flax against
  PyTorch by construction; `parity_tests/test_float64.train_in_lockstep` holds both against
  the independent float64 reference (parity_tests/reference.py), which must see them.

Tiers: `float64` and `highest` are parity.run's; `reference` is the independent
implementation. `size_sweep` shrinks the scalar bugs (attention scale, one LayerNorm's
epsilon, AdamW's epsilon) to find the smallest relative change each tier catches.

Command line (parsing and printing only):
    PYTHONPATH=. python -m parity_tests.mutations --json PATH [--sizes] [--only NAME ...]
"""

import argparse
import contextlib
import dataclasses
import math
import re
import sys
import tempfile
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
from flax import nnx

import flax_gpt.core.config as config_module
import flax_gpt.train as flax_train
import torch_reference.model as torch_model
import torch_reference.train as torch_train
from flax_gpt import model as flax_model
from flax_gpt.core import data, hparams, streams, weights
from flax_gpt.core.config import GPTConfig
from flax_gpt.sidebyside import decoding, pair, parity
from flax_gpt.sidebyside.tolerances import DIRECT
from parity_tests.detector import Patch, patched

CONFIG = GPTConfig.preset("tiny")  # two layers: a bug in layer 1 leaves layer 0 clean
SEED = 0
BATCH_SIZE = 4  # parity.run's default
# Past the 5-step warmup, with a clip at the median of the first 5 steps' gradient norms
# (parity.probe_clip): the clipping branch runs on some steps and not on others.
TRAIN_STEPS = 8
TIERS = ("float64", "highest")  # parity.run's judged tiers
REFERENCE = "reference"  # both frameworks against parity_tests/reference.py, float64
DECODE_PROMPTS = ([3, 1, 4], [1, 5, 9, 2, 6])
DECODE_STEPS = 6  # step 0 is the prefill's token; steps 1.. come from the cache
# Relative changes of the scalar bugs: issue 20's 1e-3 down to 1e-12, with 1e-10 (where
# float64 is expected to see what float32 cannot) and 1 and 0.1 (where float32 starts to).
SIZES = (1.0, 1e-1, 1e-3, 1e-6, 1e-9, 1e-10, 1e-12)
LN_LAYER = 1  # the one layer whose LayerNorm epsilon is wrong
DROPOUT = 0.1  # the shared-mask comparison's rate

FORWARD, TRAINING, DECODE, SHARED = "forward", "training", "decode", "shared"


@dataclass(frozen=True)
class Mutation:
    """One planted bug and where the verdict must say the two part.

    `expect`: divergence entries the verdict must name, exactly (or NoEarlierThan); `clean`:
    divergence keys that must be absent (parts of the computation the bug cannot reach: a
    training bug's forward and gradients). `tiers`: where it must be caught and located; the
    suite (test_mutations.py) runs it in the first, the catalogue in all.
    `retrace`: the patch changes code that JAX traces, so JAX's caches are cleared around
    it; patches of PyTorch or of numpy code outside a trace keep every compiled function.
    `harness`: a patch both frameworks need for the comparison to exist at all (shared
    dropout masks), in force with and without the bug."""

    patch: Patch
    kind: str
    expect: dict
    clean: tuple = ()
    tiers: tuple = ("highest", "float64")  # highest first: the tier `flax-gpt parity` runs
    retrace: bool = False
    config: GPTConfig = CONFIG
    harness: Patch = None

    @property
    def name(self):
        return self.patch.name


@dataclass(frozen=True)
class NoEarlierThan:
    """A training step the verdict must name, at `step` or later: a bug too small to move
    the loss past the tolerance at the first step it reaches shows at a later one, but
    never at an earlier one."""

    step: int


@dataclass(frozen=True)
class Matching:
    """A name the verdict must give that matches `pattern` (re.fullmatch): a kind of tensor."""

    pattern: str


# Decay skipped on exactly these: the tensor furthest apart after training must be one of them.
UNDECAYED = r".*(\.bias|\.layer_norm\d\.weight)"

# The clip bug changes only steps that clip: its first visible loss is at or after the step
# that follows the first step PyTorch clipped (derived from the run).
AFTER_FIRST_CLIP = "after the first clipped step"


def fresh_flax_steps(set_):
    """An empty cache of Flax train steps for the patch's lifetime: a step keeps the
    optimizer (and its learning-rate table) it was made with, so an optimizer patch needs
    a step of its own, and must not leave it behind."""
    set_(flax_train, "_STEPS", OrderedDict())


def after_init(cls, change):
    """cls.__init__ followed by change(self): a bug in one built instance (one layer)."""
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        change(self)

    return __init__


# ---- forward bugs ----------------------------------------------------------------------------

def torch_attention_scale(factor):
    """PyTorch's scores multiplied by `factor` (relative change factor - 1), the product
    taken in Python floats so that float64 sees every size (float32 rounds it)."""
    def apply(set_):
        def masked_softmax(self, q, k, v, mask):
            dk = q.shape[3]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            scores = q @ k.transpose(-2, -1) * (factor / math.sqrt(dk))  # the bug: factor
            scores = scores.masked_fill(~mask, torch_model.MASK_FILL)
            return (self.attn_dropout(torch.softmax(scores, dim=-1)) @ v).transpose(1, 2)

        set_(torch_model.MaskedMultiHeadAttention, "masked_softmax", masked_softmax)
    return apply


def torch_layer_norm_eps(eps):
    """Layer LN_LAYER's layer_norm1 in PyTorch with epsilon `eps`; every other as configured."""
    def apply(set_):
        def change(decoder):
            decoder.layers[LN_LAYER].layer_norm1.eps = eps
        set_(torch_model.Decoder, "__init__", after_init(torch_model.Decoder, change))
    return apply


def flax_layer_norm_eps(eps):
    """The same in Flax (nnx.LayerNorm's `epsilon` is static: the graphdef carries it)."""
    def apply(set_):
        def change(decoder):
            decoder.layers[LN_LAYER].layer_norm1.epsilon = eps
        set_(flax_model.Decoder, "__init__", after_init(flax_model.Decoder, change))
    return apply


def torch_mask_one_ahead(set_):
    """PyTorch's causal mask built with the diagonal one to the right: each query sees the next key."""
    def change(mhma):
        T = mhma.causal_mask.shape[0]
        mhma.causal_mask = torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    set_(torch_model.MaskedMultiHeadAttention, "__init__",
         after_init(torch_model.MaskedMultiHeadAttention, change))


def torch_softmax_axis(set_):
    """PyTorch's attention softmax normalised over queries (dim -2) instead of keys."""
    def masked_softmax(self, q, k, v, mask):
        dk = q.shape[3]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1) / math.sqrt(dk)).masked_fill(~mask, torch_model.MASK_FILL)
        return (self.attn_dropout(torch.softmax(scores, dim=-2)) @ v).transpose(1, 2)

    set_(torch_model.MaskedMultiHeadAttention, "masked_softmax", masked_softmax)


def flax_loss_sum(set_):
    """Flax's cross-entropy summed over the kept positions, not averaged."""
    def cross_entropy(logits, labels):
        logits = logits.reshape(-1, logits.shape[-1]).astype(flax_model.at_least_float32(logits.dtype))
        labels = labels.reshape(-1)
        keep = labels != flax_model.IGNORE_INDEX
        picked = jnp.take_along_axis(logits, jnp.where(keep, labels, 0)[:, None], axis=-1)[:, 0]
        return jnp.sum(jnp.where(keep, jax.nn.logsumexp(logits, axis=-1) - picked, 0.0))

    for module in (flax_model, flax_train):  # imported by name in both
        set_(module, "cross_entropy", cross_entropy)


LABEL_SMOOTHING = 0.1


def torch_label_smoothing(set_):
    """PyTorch's loss with F.cross_entropy's label_smoothing."""
    def cross_entropy(logits, labels):
        logits = logits.reshape(-1, logits.shape[-1]).to(torch_model.at_least_float32(logits.dtype))
        return F.cross_entropy(logits, labels.reshape(-1).long(), ignore_index=torch_model.IGNORE_INDEX,
                               label_smoothing=LABEL_SMOOTHING)

    for module in (torch_model, torch_train):
        set_(module, "cross_entropy", cross_entropy)


SQUARE = f"decoder.layers.{LN_LAYER}.mhma.out.weight"  # square: no shape error betrays it


def to_flax_untransposed(set_):
    """weights.to_flax leaves layer 1's mhma.out weight untransposed (Flax gets W, not W.T)."""
    original = weights.to_flax

    def to_flax(tensors):
        tree = original(tensors)
        node = tree["decoder"]["layers"][LN_LAYER]["mhma"]["out"]
        node["kernel"] = np.ascontiguousarray(node["kernel"].T)  # the transpose undone
        return tree

    set_(weights, "to_flax", to_flax)


def from_flax_untransposed(set_):
    """weights.from_flax returns layer 1's mhma.out kernel as it is: every canonical tensor
    read back from Flax (its gradients, its trained weights) holds W.T there."""
    original = weights.from_flax

    def from_flax(config, tree):
        tensors = original(config, tree)
        tensors[SQUARE] = np.ascontiguousarray(tensors[SQUARE].T)
        return tensors

    set_(weights, "from_flax", from_flax)


def torch_set_canonical_transposed(set_):
    """PyTorch's set_canonical transposes layer 0's (square) query weight."""
    original = torch_model.set_canonical
    name = "decoder.layers.0.mhma.q.weight"

    def set_canonical(model, tensors):
        original(model, {**tensors, name: np.ascontiguousarray(tensors[name].T)})

    for module in (torch_model, torch_train):
        set_(module, "set_canonical", set_canonical)


def offset_positions(original):
    """A positional table whose row p is SPEC's row p + 1 (positions counted from 1)."""
    def positional_encoding(seq_len, d_model, dtype=np.float32):
        return original(seq_len + 1, d_model, dtype)[1:]
    return positional_encoding


def torch_positions_offset(set_):
    set_(torch_model, "positional_encoding", offset_positions(config_module.positional_encoding))


RELU_LEAK = 0.01  # the gradient a negative ReLU input lets through


class _LeakyBackwardReLU(torch.autograd.Function):
    """ReLU forward, leaky backward: the forward is right, only gradients are wrong."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.where(x > 0, 1.0, RELU_LEAK).to(grad.dtype)


def torch_relu_backward_leak(set_):
    """Layer 0's ReLU in PyTorch passes RELU_LEAK of the gradient where its input is < 0."""
    def forward(self, x):
        relu = _LeakyBackwardReLU.apply if getattr(self, "leaky_backward", False) else F.relu
        return self.dropout(self.fc2(relu(self.fc1(x))))

    def change(decoder):
        decoder.layers[0].ffn.leaky_backward = True

    set_(torch_model.FeedForward, "forward", forward)
    set_(torch_model.Decoder, "__init__", after_init(torch_model.Decoder, change))


# ---- dropout: a shared-mask comparison -------------------------------------------------------
# The frameworks draw dropout masks from different streams, so no parity comparison runs
# with dropout on (parity uses dropout 0, test_dropout.py checks rates and eval mode). This
# harness gives both the same masks: each dropout module draws its mask from a seed of its
# own path in the model ("decoder.layers.0.ffn.dropout" in both), in train or eval mode.
# Under it the two correct models agree; a dropout moved elsewhere draws another shape or
# multiplies another tensor.

def keep_scale(site, shape, rate):
    """0 or 1 / (1 - rate) per element, from `site`'s own seed: the same array in both."""
    rng = np.random.default_rng(zlib.crc32(site.encode()))
    return (rng.random(shape) >= rate) / (1.0 - rate)


def shared_dropout_masks(set_):
    def flax_call(self, inputs, *, deterministic=None, rngs=None):
        if not self.rate:
            return inputs
        return inputs * jnp.asarray(keep_scale(self.site, inputs.shape, self.rate), inputs.dtype)

    def torch_forward(self, x):
        if not self.p:
            return x
        return x * torch.from_numpy(keep_scale(self.site, tuple(x.shape), self.p)).to(x)

    def name_flax_sites(model):
        for path, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Dropout):
                node.site = ".".join(map(str, path))

    def name_torch_sites(model):
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Dropout):
                module.site = path

    set_(nnx.Dropout, "__call__", flax_call)
    set_(torch.nn.Dropout, "forward", torch_forward)
    set_(flax_model.GPT, "__init__", after_init(flax_model.GPT, name_flax_sites))
    set_(torch_model.GPT, "__init__", after_init(torch_model.GPT, name_torch_sites))


SHARED_MASKS = Patch("shared dropout masks", "both", "each dropout's mask seeded by its path in "
                     "the model, the same in both frameworks, in train and eval mode",
                     shared_dropout_masks)


def torch_dropout_before_fc2(set_):
    """PyTorch's feed-forward dropout on fc2's input (the ReLU's output) instead of its output."""
    def forward(self, x):
        return self.fc2(self.dropout(F.relu(self.fc1(x))))

    set_(torch_model.FeedForward, "forward", forward)


# ---- training bugs -----------------------------------------------------------------------------

def torch_adamw(**changes):
    """PyTorch's AdamW rebuilt with `changes` to its settings (eps, betas)."""
    def apply(set_):
        original = torch_train.TrainStep.__init__

        def __init__(self, model, tc, *, device="cpu"):
            original(self, model, tc, device=device)
            settings = {"lr": float(self.lrs[0]), "betas": (tc.beta1, tc.beta2), "eps": tc.eps,
                        "weight_decay": tc.weight_decay, **changes}
            self.optimizer = torch.optim.AdamW(model.parameters(), **settings)

        set_(torch_train.TrainStep, "__init__", __init__)
    return apply


def torch_adamw_eps(factor):
    """PyTorch's AdamW epsilon times `factor` (the configured one is TrainConfig's 1e-8)."""
    return torch_adamw(eps=hparams.TrainConfig().eps * factor)


TORCH_DEFAULT_BETA2 = 0.999  # torch.optim.AdamW's default; the config says 0.95


def flax_decay_matrices_only(set_):
    """Flax's AdamW decays only weights of 2 or more dimensions (GPT-2 practice): biases,
    LayerNorm and nothing else escape it, against SPEC's decay on every parameter."""
    def optimizer(tc):
        lrs = jnp.asarray(hparams.learning_rates(tc))
        adamw = optax.adamw(lambda count: lrs[jnp.minimum(count, tc.steps - 1)], b1=tc.beta1,
                            b2=tc.beta2, eps=tc.eps, weight_decay=tc.weight_decay,
                            mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
        if tc.grad_clip:
            return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
        return adamw

    for module in (flax_train, parity):  # parity imports it by name
        set_(module, "optimizer", optimizer)
    fresh_flax_steps(set_)


CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: max_norm / (norm + 1e-6)


def torch_clip_eps(set_):
    """PyTorch's clip as clip_grad_norm_ computes it: the norm it compares and divides by
    has 1e-6 added (torch_reference/train.py writes optax's g / norm * max_norm)."""
    original = torch_train.global_norm
    set_(torch_train, "global_norm", lambda tensors: original(tensors) + CLIP_EPS)


def torch_lr_one_ahead(set_):
    """PyTorch's trainer reads the learning rate of the next step (and so ends one early)."""
    original = torch_train.TrainStep.__call__
    set_(torch_train.TrainStep, "__call__", lambda self, index, x, y: original(self, index + 1, x, y))


def torch_accumulation_divides_twice(set_):
    """PyTorch's accumulated gradients (already the sum of loss / grad_accum's) divided by
    grad_accum once more: the mean of means. The loss it reports is right."""
    def __call__(self, index, x, y):
        tc = self.tc
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lrs[min(index, tc.steps - 1)])
        if self.model.config.dropout:
            torch.manual_seed(tc.seed * 1_000_003 + index)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device, dtype=self.params[0].dtype)
        for i in range(len(x)):
            with torch_train.precision.autocast(tc.precision, self.device.type):
                micro = torch_train.cross_entropy(self.model(x[i]), y[i]) / len(x)
            micro.backward()
            loss += micro.detach()
        for p in self.params:  # the bug
            p.grad /= len(x)
        grad_norm = torch_train.global_norm([p.grad for p in self.params])
        if tc.grad_clip:
            clip = grad_norm > tc.grad_clip
            for p in self.params:
                p.grad.copy_(torch.where(clip, p.grad / grad_norm * tc.grad_clip, p.grad))
        self.optimizer.step()
        return {"loss": loss, "grad_norm": grad_norm}

    set_(torch_train.TrainStep, "__call__", __call__)


# ---- decode bug ------------------------------------------------------------------------------

def torch_cache_one_behind(set_):
    """PyTorch's decode writes each token's key and value one slot early (position - 1),
    over the previous token's, and leaves its own slot empty."""
    def decode(self, x, cache, position):
        B, _, d = x.shape
        q, k, v = self.heads(x)
        rows = torch.arange(B, device=x.device)
        cache.k[rows, position - 1] = k[:, 0].to(cache.k.dtype)  # the bug: - 1
        cache.v[rows, position - 1] = v[:, 0].to(cache.v.dtype)
        S = cache.k.shape[1]
        visible = torch.arange(S, device=x.device)[None, :] <= position[:, None]
        y = self.masked_softmax(q, cache.k, cache.v, visible[:, None, None, :])
        return self.dropout(self.out(y.reshape(B, 1, d))), cache

    set_(torch_model.MaskedMultiHeadAttention, "decode", decode)


# ---- shared bugs (flax_gpt/core): both frameworks take the same wrong thing --------------------

def core_positions_offset(set_):
    """The shared table counted from position 1, where each model module looks it up."""
    wrong = offset_positions(config_module.positional_encoding)
    for module in (config_module, flax_model, torch_model):
        set_(module, "positional_encoding", wrong)


def core_rates_one_ahead(set_):
    """The shared learning-rate table one step ahead: entry s is step s + 1's rate."""
    original = hparams.learning_rates

    def learning_rates(tc):
        return original(tc.replace(steps=tc.steps + 1))[1:]

    for module in (hparams, flax_train, torch_train):
        set_(module, "learning_rates", learning_rates)
    fresh_flax_steps(set_)


def core_labels_unshifted(set_):
    """make_batch labels each position with its own token instead of the next one."""
    def make_batch(rows):
        x = rows.astype(np.int32)
        y = x.copy()
        y[:, -1] = data.IGNORE_INDEX
        return x, y

    for module in (data, streams):  # streams imports it by name
        set_(module, "make_batch", make_batch)


# ---- the catalogue ---------------------------------------------------------------------------

TRAINING_CLEAN = ("forward", "backward", "gradient_tensor")
# a loss bug leaves every layer's output alone; the backward pass parts at its very top
LOSS_PLACE = {"backward": f"layer {CONFIG.n_layers - 1} output", "gradient_tensor": "pred.bias"}
FLAX_DEFAULT_LN_EPS = 1e-6  # nnx.LayerNorm's default epsilon; SPEC (and PyTorch) say 1e-5

MUTATIONS = [
    # forward: where the two first part, from the embedding up
    Mutation(Patch("attention scale 1/dk", "torch", "PyTorch's scores divided by dk, not sqrt(dk)",
                   torch_attention_scale(1 / math.sqrt(CONFIG.head_dim))),
             FORWARD, {"forward": "layer 0 output"}),
    Mutation(Patch(f"LayerNorm eps in layer {LN_LAYER}", "flax",
                   f"Flax's default epsilon {FLAX_DEFAULT_LN_EPS:g} in layer {LN_LAYER}'s layer_norm1 only",
                   flax_layer_norm_eps(FLAX_DEFAULT_LN_EPS)),
             FORWARD, {"forward": f"layer {LN_LAYER} output"}, tiers=("float64",), retrace=True),
    Mutation(Patch("causal mask one ahead", "torch", "tril(diagonal=1): each query sees the next key",
                   torch_mask_one_ahead), FORWARD, {"forward": "layer 0 output"}),
    Mutation(Patch("softmax over queries", "torch", "attention softmax over dim -2",
                   torch_softmax_axis), FORWARD, {"forward": "layer 0 output"}),
    Mutation(Patch("loss summed", "flax", "cross-entropy summed over labels, not averaged",
                   flax_loss_sum, attention="any"),
             FORWARD, LOSS_PLACE, clean=("forward",), retrace=True, tiers=("float64", "highest")),
    Mutation(Patch("label smoothing", "torch", f"F.cross_entropy(label_smoothing={LABEL_SMOOTHING})",
                   torch_label_smoothing, attention="any"),
             FORWARD, LOSS_PLACE, clean=("forward",)),
    Mutation(Patch("to_flax: square weight untransposed", "flax",
                   f"core/weights.py to_flax leaves {SQUARE} untransposed", to_flax_untransposed,
                   attention="any"),
             FORWARD, {"forward": f"layer {LN_LAYER} output"}),
    Mutation(Patch("from_flax: square gradient untransposed", "flax",
                   f"core/weights.py from_flax leaves {SQUARE} untransposed", from_flax_untransposed,
                   attention="any"),
             FORWARD, {"gradient_tensor": SQUARE}, clean=("forward", "backward")),
    Mutation(Patch("set_canonical: square weight transposed", "torch",
                   "PyTorch's set_canonical transposes decoder.layers.0.mhma.q.weight",
                   torch_set_canonical_transposed, attention="any"),
             FORWARD, {"forward": "layer 0 output"}),
    Mutation(Patch("positions offset (torch)", "torch", "PyTorch's positional table counted from 1",
                   torch_positions_offset, attention="any"),
             FORWARD, {"forward": "embed output"}),
    Mutation(Patch("ReLU backward leaks in layer 0", "torch",
                   f"layer 0's ReLU passes {RELU_LEAK} of the gradient below 0 (forward exact)",
                   torch_relu_backward_leak, attention="any"),
             FORWARD, {"backward": "embed output", "gradient_tensor": "decoder.layers.0.ffn.fc1.bias"},
             clean=("forward",)),
    Mutation(Patch("dropout before fc2", "torch", "the feed-forward dropout on fc2's input, "
                   "compared with shared masks at rate 0.1", torch_dropout_before_fc2),
             FORWARD, {"forward": "layer 0 output"}, config=CONFIG.replace(dropout=DROPOUT),
             harness=SHARED_MASKS, tiers=("float64", "highest")),
    # training: the forward and gradients agree; a step's loss parts
    Mutation(Patch("AdamW eps x10", "torch", "PyTorch's AdamW epsilon 1e-7, not 1e-8",
                   torch_adamw_eps(10.0), attention="any"),
             TRAINING, {"training_step": 2}, clean=TRAINING_CLEAN, tiers=("float64",)),
    # Adam's first step is m_hat / sqrt(v_hat) = g / |g| whatever beta2: step 2's update is
    # the first that beta2 changes, step 3's loss the first that shows it
    Mutation(Patch("AdamW beta2 default", "torch",
                   f"PyTorch's AdamW with its default beta2 {TORCH_DEFAULT_BETA2}, not 0.95",
                   torch_adamw(betas=(hparams.TrainConfig().beta1, TORCH_DEFAULT_BETA2)), attention="any"),
             TRAINING, {"training_step": 3}, clean=TRAINING_CLEAN, tiers=("float64",)),
    Mutation(Patch("no decay on biases and LayerNorm", "flax",
                   "Flax's AdamW masks weight decay to weights of >= 2 dimensions",
                   flax_decay_matrices_only, attention="any"),
             TRAINING, {"training_step": 2, "trained_tensor": Matching(UNDECAYED)}, clean=TRAINING_CLEAN,
             tiers=("float64",)),
    Mutation(Patch("clip norm + 1e-6", "torch", "PyTorch clips as clip_grad_norm_ does: norm + 1e-6",
                   torch_clip_eps, attention="any"),
             TRAINING, {"training_step": AFTER_FIRST_CLIP}, clean=TRAINING_CLEAN, tiers=("float64",)),
    Mutation(Patch("learning rate one step ahead", "torch", "PyTorch's step s uses step s+1's rate",
                   torch_lr_one_ahead, attention="any"),
             TRAINING, {"training_step": 2}, clean=TRAINING_CLEAN, tiers=("float64",)),
    Mutation(Patch("accumulation divides twice", "torch",
                   "PyTorch's accumulated gradient divided by grad_accum again",
                   torch_accumulation_divides_twice, attention="any"),
             TRAINING, {"training_step": 2}, clean=TRAINING_CLEAN, tiers=("float64",)),
    # decode: training parity cannot see it
    Mutation(Patch("KV cache one slot behind", "torch",
                   "PyTorch's decode writes each key and value at position - 1", torch_cache_one_behind),
             DECODE, {"decode_step": 1}, clean=TRAINING_CLEAN, tiers=("highest",)),
    # shared code: only the independent reference sees it
    Mutation(Patch("positions offset (core)", "core", "core/config.py's table counted from 1",
                   core_positions_offset, attention="any"),
             SHARED, {"reference_loss_step": 1}, tiers=(REFERENCE,)),
    Mutation(Patch("learning-rate table one ahead (core)", "core",
                   "core/hparams.py's learning_rates one step ahead", core_rates_one_ahead,
                   attention="any"),
             SHARED, {"reference_weights_step": 1, "reference_loss_step": 2}, tiers=(REFERENCE,)),
    Mutation(Patch("labels unshifted (core)", "core",
                   "core/data.py make_batch labels each position with its own token",
                   core_labels_unshifted, attention="any"),
             SHARED, {"reference_loss_step": 1}, tiers=(REFERENCE,)),
]
BY_NAME = {m.name: m for m in MUTATIONS}


# ---- running one mutation ----------------------------------------------------------------------

@dataclass
class Outcome:
    """One mutation in one tier: did the comparison fail (`caught`), which rows, where the
    verdict says the two part, and whether that is the place the bug is (`located`)."""

    mutation: str
    framework: str
    kind: str
    tier: str
    caught: bool
    failed: list  # the rows (or reference checks) that failed
    inconclusive: list
    divergence: dict
    expected: dict  # the divergence entries the bug must produce, and "absent": keys it must not
    located: bool
    seconds: float
    expected_caught: bool  # the suite asserts this tier (a shared bug: the reference alone)
    details: dict = field(default_factory=dict)  # per-kind evidence (a control run, figures)


def _quiet(*_):
    pass


def _attention(mutation):
    return "explicit" if mutation.patch.attention == "any" else mutation.patch.attention


def _parity(mutation, tier, train_steps):
    return parity.run(mutation.config, precision=tier, attention=_attention(mutation),
                      batch_size=BATCH_SIZE, train_steps=train_steps, seed=SEED, progress=_quiet)


@contextlib.contextmanager
def in_force(mutation):
    """The mutation's harness (if any) and its patch."""
    with patched(mutation.harness, retrace=True), patched(mutation.patch, retrace=mutation.retrace):
        yield


def expected_place(mutation, result=None):
    """The mutation's `expect`, with AFTER_FIRST_CLIP resolved from `result`'s gradient norms."""
    out = dict(mutation.expect)
    for key, value in out.items():
        if value == AFTER_FIRST_CLIP:
            clipped = first_clipped_step(result) if result is not None else None
            out[key] = NoEarlierThan(clipped + 1) if clipped else value
    return out


def first_clipped_step(result):
    """1-based first step whose global gradient norm (PyTorch's) exceeded the probed clip."""
    row = next((r for r in result.rows if r.quantity.startswith("train loss, each of")), None)
    if row is None or not result.train_config:
        return None
    norms = np.asarray(row.figures["torch_grad_norms"])
    above = np.nonzero(norms > result.train_config["grad_clip"])[0]
    return int(above[0]) + 1 if len(above) else None


def is_located(expected, clean, divergence):
    """Every expected entry named (exactly; NoEarlierThan: at or after its step; Matching: a
    name of its pattern), and no `clean` key named."""
    def named(key, want):
        got = divergence.get(key)
        if isinstance(want, NoEarlierThan):
            return isinstance(got, int) and got >= want.step
        if isinstance(want, Matching):
            return isinstance(got, str) and re.fullmatch(want.pattern, got) is not None
        return got == want

    return all(named(k, v) for k, v in expected.items()) and not any(k in divergence for k in clean)


def _recorded(expected):
    """`expected` as the JSON records it: NoEarlierThan(s) as {"at_least": s}, Matching(p)
    as {"matching": p}."""
    def recorded(v):
        if isinstance(v, NoEarlierThan):
            return {"at_least": v.step}
        return {"matching": v.pattern} if isinstance(v, Matching) else v

    return {k: recorded(v) for k, v in expected.items()}


def check(mutation, tier):
    """Run `mutation` in `tier` (one of TIERS, or REFERENCE for a shared bug) and return an
    Outcome. The precision is left at `tier`'s (callers restore their own)."""
    start = time.perf_counter()
    if mutation.kind == DECODE:
        outcome = _check_decode(mutation, tier)
    elif tier == REFERENCE:
        outcome = _check_reference(mutation)
    else:
        outcome = _check_parity(mutation, tier)
    outcome.seconds = time.perf_counter() - start
    return outcome


def _outcome(mutation, tier, failed, inconclusive, divergence, expected, details=None):
    return Outcome(mutation.name, mutation.patch.framework, mutation.kind, tier, bool(failed),
                   list(failed), list(inconclusive), dict(divergence),
                   {**_recorded(expected), "absent": list(mutation.clean)},
                   is_located(expected, mutation.clean, divergence), 0.0,
                   tier in mutation.tiers, details or {})


def _check_parity(mutation, tier):
    train_steps = 0 if mutation.kind == FORWARD else TRAIN_STEPS
    details = {}
    with patched(mutation.harness, retrace=True):  # one compilation for the control and the bug
        if mutation.harness:  # the comparison the harness makes must pass on correct code
            control = _parity(mutation, tier, train_steps)
            details["control_passed"] = control.passed
            details["control_failed"] = control.failed
        with patched(mutation.patch, retrace=mutation.retrace):
            result = _parity(mutation, tier, train_steps)
    details["rows"] = {r.quantity: [r.max_abs, r.max_rel, r.tolerance]
                       for r in result.rows if r.tolerance is not None}
    if result.train_config:
        details["grad_clip"] = result.train_config["grad_clip"]
    return _outcome(mutation, tier, result.failed, result.inconclusive, result.divergence,
                    expected_place(mutation, result), details)


def _check_decode(mutation, tier):
    """Forward parity under the bug (it must pass: prefill and training never read the cache),
    then greedy generation side by side: the first step whose logits differ."""
    with in_force(mutation):
        forward = _parity(mutation, tier, 0)
        pair.apply_precision(tier)
        fm, tm = pair.build_pair(mutation.config, pair.random_weights(mutation.config, SEED), tier)
        c = decoding.compare_generation(fm, tm, [list(p) for p in DECODE_PROMPTS], DECODE_STEPS,
                                        temperature=0)
    above = [i for i, d in enumerate(c.step_logits_diff) if not d <= DIRECT[tier].layers]
    divergence = dict(forward.divergence)
    failed = list(forward.failed)
    if above:
        divergence["decode_step"] = above[0]
        failed.append(f"decode logits, step {above[0]}")
    return _outcome(mutation, tier, failed, forward.inconclusive, divergence,
                    expected_place(mutation),
                    {"step_logits_diff": c.step_logits_diff, "first_mismatch": c.first_mismatch,
                     "forward_parity_passed": forward.passed})


def reference_run():
    from parity_tests import test_float64

    # test_the_reference_catches_a_bug_in_shared_code's run: warmup, cosine, a clip
    return test_float64.ReferenceRun(steps=6, batch_size=2, grad_accum=1, warmup=2, clip=1.0)


def _check_reference(mutation):
    """Both frameworks and the independent reference in lockstep, float64, weights compared
    after every step (test_float64.train_in_lockstep): the first step whose loss, and the
    first whose weights, leave the reference's tolerances. Flax against PyTorch on the same
    run is recorded too: a shared bug must leave them agreeing."""
    from parity_tests import test_float64

    pair.apply_precision("float64")
    with in_force(mutation), tempfile.TemporaryDirectory() as tmp:
        out = test_float64.train_in_lockstep(Path(tmp), "tiny", reference_run())
    ref = np.asarray(out.reference_losses)
    loss_gap = np.maximum(np.abs(out.flax.losses - ref), np.abs(out.torch.losses - ref))
    weight_gap = np.asarray([max(f, t) for (f, _), (t, _) in zip(out.flax_vs_reference,
                                                                out.torch_vs_reference)])
    divergence = {}
    for key, gap, tolerance in (("reference_loss_step", loss_gap, test_float64.REFERENCE_TRAIN_ATOL),
                                ("reference_weights_step", weight_gap, test_float64.REFERENCE_PARAMS_ATOL)):
        step = parity.first_step_above(gap, tolerance)
        if step:
            divergence[key] = step
    failures = out.reference_failures()
    return _outcome(mutation, REFERENCE, failures[:6] + ([f"... {len(failures) - 6} more"]
                                                          if len(failures) > 6 else []),
                    [], divergence, expected_place(mutation),
                    {"framework_failures": out.framework_failures(),
                     "loss_gap": loss_gap.tolist(), "weight_gap": weight_gap.tolist()})


# ---- the catalogue and the size sweep ----------------------------------------------------------

def tiers_of(mutation, tiers=TIERS):
    """The tiers a catalogue runs a mutation in: `tiers`, and the reference for shared bugs."""
    return [*tiers, *([REFERENCE] if mutation.kind == SHARED else [])]


@dataclass
class CatalogueResult:
    """Every mutation in every tier it ran in; `sweeps`: size_sweep's SweepPoints."""

    outcomes: list = field(default_factory=list)
    sweeps: list = field(default_factory=list)
    command: str = ""
    environment: dict = field(default_factory=dict)

    @property
    def missed(self):
        """Outcomes of tiers that must catch the bug and did not, or named the wrong place."""
        return [o for o in self.outcomes if o.expected_caught and not (o.caught and o.located)]

    def smallest_caught(self):
        """{scalar: {tier: the smallest relative change caught (None: none of the sizes)}}."""
        return {scalar: {tier: min(v["caught"], default=None) for tier, v in by_tier.items()}
                for scalar, by_tier in self.sweep_summary().items()}

    def sweep_summary(self):
        """{scalar: {tier: {"caught": sizes, "missed": sizes}}}: not assumed monotonic."""
        out = {}
        for p in self.sweeps:
            entry = out.setdefault(p.scalar, {}).setdefault(p.tier, {"caught": [], "missed": []})
            entry["caught" if p.caught else "missed"].append(p.size)
        return out

    def to_dict(self):
        return {**self.environment, "command": self.command,
                "outcomes": [dataclasses.asdict(o) for o in self.outcomes],
                "missed": [f"{o.mutation} ({o.tier})" for o in self.missed],
                "sweeps": [dataclasses.asdict(p) for p in self.sweeps],
                "sweep_summary": self.sweep_summary(), "smallest_caught": self.smallest_caught(),
                "settings": {"config": CONFIG.to_dict(), "train_steps": TRAIN_STEPS,
                             "batch_size": BATCH_SIZE, "seed": SEED, "sizes": list(SIZES),
                             "decode_prompts": [list(p) for p in DECODE_PROMPTS],
                             "decode_steps": DECODE_STEPS}}


def catalogue(mutations=MUTATIONS, tiers=TIERS, *, log=_quiet):
    """Each of `mutations` in each of `tiers` (shared bugs also against the reference), the
    precision put back to `highest` after each. Returns a CatalogueResult."""
    result = CatalogueResult()
    for m in mutations:
        for tier in tiers_of(m, tiers):
            try:
                outcome = check(m, tier)
            finally:
                pair.apply_precision("highest")
            result.outcomes.append(outcome)
            log(outcome)
    return result


@dataclass
class SweepPoint:
    scalar: str
    size: float  # relative change of the scalar
    tier: str
    caught: bool
    failed: list
    divergence: dict
    rows: dict  # quantity -> [max_abs, max_rel, tolerance] of every judged row
    float32_distinct: bool  # float32 holds the changed scalar apart from the right one
    seconds: float


def scale_mutation(size):
    return Mutation(Patch(f"attention scale x(1+{size:g})", "torch", "",
                          torch_attention_scale(1 + size)), FORWARD, {})


def layer_norm_eps_mutation(size):
    return Mutation(Patch(f"LayerNorm eps x(1+{size:g}) in layer {LN_LAYER}", "torch", "",
                          torch_layer_norm_eps(CONFIG.layer_norm_eps * (1 + size))), FORWARD, {})


def adamw_eps_mutation(size):
    return Mutation(Patch(f"AdamW eps x(1+{size:g})", "torch", "", torch_adamw_eps(1 + size)),
                    TRAINING, {})


# the scalar bugs, each a PyTorch patch (no recompilation) of a relative size, and the
# right value of the scalar it changes
SCALARS = {"attention scale": (scale_mutation, 1 / math.sqrt(CONFIG.head_dim)),
           f"LayerNorm eps (layer {LN_LAYER})": (layer_norm_eps_mutation, CONFIG.layer_norm_eps),
           "AdamW eps": (adamw_eps_mutation, hparams.TrainConfig().eps)}


def size_sweep(scalars=tuple(SCALARS), sizes=SIZES, tiers=TIERS, *, log=_quiet):
    """Each scalar bug at each relative size in each tier: a list of SweepPoints."""
    points = []
    for scalar in scalars:
        make, value = SCALARS[scalar]
        for size in sizes:
            m = make(size)
            for tier in tiers:
                try:
                    o = check(m, tier)
                finally:
                    pair.apply_precision("highest")
                distinct = bool(np.float32(value * (1 + size)) != np.float32(value))
                points.append(SweepPoint(scalar, size, tier, o.caught, o.failed, o.divergence,
                                         o.details.get("rows", {}), distinct, o.seconds))
                log(points[-1])
    return points


# ---- the command ------------------------------------------------------------------------------

def outcome_cell(o):
    """yes (caught and located), 'caught, named X' (the wrong place), 'caught, nothing named',
    no ('not expected': a tier the mutation need not be caught in, a shared bug's parity)."""
    if not o.caught:
        return "no" if o.expected_caught else "no (not expected)"
    if o.located:
        return "yes"
    return f"caught, named {o.divergence}" if o.divergence else "caught, nothing named"


def table(result):
    """The catalogue as text: per mutation, each tier's verdict and the row that catches it."""
    tiers = list(dict.fromkeys(o.tier for o in result.outcomes))
    lines = [" | ".join(["mutation", "framework", *tiers, "first failing row", "divergence"])]
    for name in dict.fromkeys(o.mutation for o in result.outcomes):
        mine = {o.tier: o for o in result.outcomes if o.mutation == name}
        first = next((o for o in mine.values() if o.caught), None)
        cells = [outcome_cell(mine[t]) if t in mine else "-" for t in tiers]
        lines.append(" | ".join([name, next(iter(mine.values())).framework, *cells,
                                 first.failed[0] if first else "-",
                                 str(first.divergence) if first else "-"]))
    if result.sweeps:
        lines += ["", "smallest relative change caught (of " + ", ".join(
            f"{s:g}" for s in dict.fromkeys(p.size for p in result.sweeps)) + "):"]
        for scalar, by_tier in result.smallest_caught().items():
            lines.append(f"  {scalar}: " + ", ".join(
                f"{tier} {size:g}" if size is not None else f"{tier} none" for tier, size in by_tier.items()))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m parity_tests.mutations", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True, help="where the result goes")
    p.add_argument("--sizes", action="store_true", help="also the size sweep of the scalar bugs")
    p.add_argument("--only", nargs="+", choices=list(BY_NAME), metavar="NAME",
                   help="these mutations alone (default: all)")
    p.add_argument("--tiers", nargs="+", choices=TIERS, default=list(TIERS))
    p.add_argument("--torch-threads", type=int, default=None,
                   help="PyTorch's intra-op threads (1 on a machine shared with other work)")
    args = p.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    mutations = [BY_NAME[n] for n in args.only] if args.only else MUTATIONS
    result = catalogue(mutations, args.tiers, log=lambda o: print(
        f"{o.mutation} ({o.tier}): {outcome_cell(o)} in {o.seconds:.1f} s", flush=True))
    if args.sizes:
        result.sweeps = size_sweep(tiers=args.tiers, log=lambda pt: print(
            f"{pt.scalar} x(1+{pt.size:g}) ({pt.tier}): {'caught' if pt.caught else 'not caught'}",
            flush=True))
    result.environment = pair.environment({})
    result.command = "python -m parity_tests.mutations " + " ".join(sys.argv[1:] if argv is None else argv)
    from flax_gpt.core.files import write_json

    write_json(args.json, result.to_dict())
    print(table(result))
    missed = result.missed
    if missed:
        print("missed or mislocated: " + ", ".join(f"{o.mutation} ({o.tier})" for o in missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
