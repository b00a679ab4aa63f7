"""The PyTorch trainer's core: the same algorithm as flax_gpt/train.py, step for step.

torch.optim.AdamW on the shared learning-rate table, global-norm clipping written as optax
writes it (g / norm * max_norm when norm > max_norm; torch's clip_grad_norm_ adds 1e-6 to
the norm), and gradient accumulation by repeated backward() of loss / grad_accum.
"""

import warnings

import numpy as np
import torch

from flax_gpt.core import runfolder, weights
from flax_gpt.core.errors import CheckpointError
from flax_gpt.core.hparams import learning_rates
from torch_reference import precision
from torch_reference.model import GPT, canonical, cross_entropy, set_canonical

OPTIMIZER = "optimizer.pt"


class TrainStep:
    """`step(index, x, y) -> {"loss", "grad_norm"}` (tensors, not synced) for one model."""

    def __init__(self, model, tc, *, device="cpu"):
        self.model, self.tc, self.device = model, tc, torch.device(device)
        self.lrs = learning_rates(tc)
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=float(self.lrs[0]), betas=(tc.beta1, tc.beta2), eps=tc.eps,
            weight_decay=tc.weight_decay)
        self.params = [p for p in model.parameters() if p.requires_grad]

    def __call__(self, index, x, y):
        """x, y: int `(grad_accum, B, T)` tensors on the device."""
        tc = self.tc
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lrs[min(index, tc.steps - 1)])
        if self.model.config.dropout:
            torch.manual_seed(tc.seed * 1_000_003 + index)  # dropout stream of this step alone
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device, dtype=self.params[0].dtype)
        for i in range(len(x)):
            with precision.autocast(tc.precision, self.device.type):
                micro = cross_entropy(self.model(x[i]), y[i]) / len(x)
            micro.backward()
            loss += micro.detach()
        grad_norm = global_norm([p.grad for p in self.params])
        if tc.grad_clip:  # torch.where, not `if`: no host sync inside the step
            clip = grad_norm > tc.grad_clip
            for p in self.params:
                p.grad.copy_(torch.where(clip, p.grad / grad_norm * tc.grad_clip, p.grad))
        self.optimizer.step()
        return {"loss": loss, "grad_norm": grad_norm}


def global_norm(tensors):
    """sqrt(sum of squares), summed as optax.tree.norm sums: per tensor, then over tensors.

    Not torch.linalg.vector_norm: on CPU (torch 2.3.1) it loses ~1e-3 relative on a tensor of
    3M entries (2.44176 against 2.44412 in float64, the `small` preset's pred.weight gradient),
    which changed the clip scale and made the two trainers drift apart by 0.2 in loss.
    """
    return torch.stack([t.pow(2).sum() for t in tensors]).sum().sqrt()


@torch.no_grad()
def eval_loss(model, x, y, *, precision_name="highest"):
    model.eval()
    with precision.autocast(precision_name, next(model.parameters()).device.type):
        return cross_entropy(model(x), y)


class TorchBackend:
    """The PyTorch side of flax_gpt.core.loop.train: model, TrainStep, checkpoint I/O."""

    name = "torch"

    def __init__(self, config, tc, tensors=None, *, device="cpu"):
        self.config, self.tc, self.device = config, tc, torch.device(device)
        torch.manual_seed(tc.seed)
        self.model = GPT(config, attention=tc.attention, dtype=precision.dtype(tc.precision))
        if tensors is not None:
            set_canonical(self.model, tensors)
        self.model.to(self.device)
        self.train_step = TrainStep(self.model, tc, device=device)

    def _tensor(self, a):
        return torch.from_numpy(np.asarray(a)).to(self.device, torch.long)

    def step(self, index, x, y):
        return self.train_step(index, self._tensor(x), self._tensor(y))

    @staticmethod
    def fetch(metrics):
        return {k: float(v) for k, v in metrics.items()}

    def lr(self, index):
        return float(self.train_step.lrs[min(index, self.tc.steps - 1)])

    def eval_loss(self, x, y):
        return float(eval_loss(self.model, self._tensor(x), self._tensor(y),
                               precision_name=self.tc.precision))

    def canonical(self):
        return canonical(self.model)

    def save(self, folder):
        weights.save(folder / runfolder.WEIGHTS, self.config, self.canonical())
        torch.save(self.train_step.optimizer.state_dict(), folder / OPTIMIZER)

    def load(self, folder):
        """Restore a checkpoint: the gathered files of one process, or the shards of an FSDP
        run (runfolder.SHARDED, torch.distributed.checkpoint), which load onto any number of
        ranks, this one process included."""
        if (folder / runfolder.SHARDED).is_dir():
            self._load_sharded(folder / runfolder.SHARDED)
            return
        tensors = runfolder.checkpoint_weights(folder, self.config)
        set_canonical(self.model, tensors)
        try:
            state = torch.load(folder / OPTIMIZER, map_location=self.device, weights_only=True)
            self.train_step.optimizer.load_state_dict(state)
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{folder / OPTIMIZER} cannot be restored: {e}") from None

    def state_dicts(self):
        """Model and optimizer state as torch.distributed.checkpoint keys them (by parameter
        name): the sharded save of FSDP, and the target any checkpoint of it loads into."""
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)

        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, self.train_step.optimizer)}

    def _load_sharded(self, path):
        import torch.distributed.checkpoint as dcp

        state = self.state_dicts()  # each tensor laid out as this backend holds it
        try:
            with warnings.catch_warnings():  # one process reading it is what we mean
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(state, checkpoint_id=str(path))
        except (OSError, RuntimeError, ValueError, KeyError, dcp.CheckpointException) as e:
            raise CheckpointError(f"{path} cannot be restored: {e}") from None
        self.set_state_dicts(state)

    def set_state_dicts(self, state, options=None):
        """Load `state_dicts()`'s kind of state (`options`: torch.distributed.checkpoint's
        StateDictOptions, e.g. whole tensors into a sharded model)."""
        from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                             set_optimizer_state_dict)

        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.train_step.optimizer, state["optim"],
                                 options=options)
