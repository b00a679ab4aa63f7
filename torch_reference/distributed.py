"""The PyTorch trainer data parallel: DistributedDataParallel, one process per rank.

    flax-gpt train --framework torch --nproc 2 ...                       # spawns 2 ranks
    torchrun --nproc-per-node 2 -m flax_gpt train --framework torch ...  # ranks from torchrun

Every rank reads the same global batch of each step from the stream (batches are addressed
by global index, flax_gpt.core.streams) and feeds only its rows, `rank * B/n` up to
`(rank + 1) * B/n`. DDP averages the gradients over the ranks during backward (gloo on CPU,
NCCL on GPUs), so every rank takes the same AdamW step. The logged loss is the mean of the
ranks' losses (`all_reduce`). Rank 0 alone writes the run folder: metrics, checkpoints and
weights (flax_gpt.core.loop with `primary=False` on the others).

The average of the ranks' mean losses is the mean over the global batch when every rank holds
the same number of labels, which SPEC.md's labels give (seq_len - 1 in every row); a batch
that breaks this is refused rather than averaged wrongly.
"""

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException
from torch.nn.parallel import DistributedDataParallel

from flax_gpt.core import loop
from flax_gpt.core.data import IGNORE_INDEX
from flax_gpt.core.errors import FlaxGPTError
from torch_reference import precision
from torch_reference.train import TorchBackend, TrainStep


class DDPBackend(TorchBackend):
    """TorchBackend on one rank of a process group: the model wrapped in DDP for the train
    step, each global batch cut to this rank's rows, the loss averaged over the ranks."""

    def __init__(self, config, tc, tensors=None, *, device="cpu"):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_batch(tc.batch_size, self.world)
        super().__init__(config, tc, tensors, device=device)
        ddp = DistributedDataParallel(self.model)  # broadcasts rank 0's parameters
        ddp.config = self.model.config  # what TrainStep reads from its model
        self.train_step = TrainStep(ddp, tc, device=device)

    def rows(self, a):
        """This rank's rows of a (grad_accum, B, T) global batch."""
        share = a.shape[1] // self.world
        return a[:, self.rank * share:(self.rank + 1) * share]

    def step(self, index, x, y):
        counts = np.sum(np.asarray(y) != IGNORE_INDEX, axis=(0, 2))  # labels of each row
        per_rank = counts.reshape(self.world, -1).sum(axis=1)
        if len(set(per_rank.tolist())) > 1:
            raise FlaxGPTError(f"step {index}: the ranks' rows hold {per_rank.tolist()} labels; "
                               f"data parallel training needs the same number on every rank")
        return super().step(index, self.rows(x), self.rows(y))

    def fetch(self, metrics):
        """The metrics of one step: the loss averaged over the ranks (a collective, which every
        rank's loop reaches at the same step); the gradient norm is already the global one."""
        loss = metrics["loss"].detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return {"loss": float(loss) / self.world, "grad_norm": float(metrics["grad_norm"])}


def check_batch(batch_size, world):
    if batch_size % world:
        raise FlaxGPTError(f"--batch-size {batch_size} does not split over --nproc {world} "
                           f"ranks: make it a multiple of {world}")


def under_torchrun():
    """True in a process that torchrun started as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def train(nproc, config, tc, stream, out, tensors=None, *, device="cpu", writer_factory=None,
          **loop_options):
    """Train on `nproc` spawned ranks, or on the ranks torchrun started (`nproc` None), with
    flax_gpt.core.loop.train's `loop_options`. `writer_factory(out)`: rank 0's metrics sink
    (TensorBoard), made in that process. Returns rank 0's history ([] on torchrun's others)."""
    check_batch(tc.batch_size, nproc or int(os.environ["WORLD_SIZE"]))
    job = (config, tc, tensors, stream, out, device, writer_factory, loop_options)
    if nproc is None:
        return _rank(None, None, None, *job)
    with socket.socket() as s:  # a free port for the rendezvous of this run's ranks
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_spawned, args=(nproc, f"tcp://127.0.0.1:{port}", job, results), nprocs=nproc)
    except ProcessException:
        errors = []
        while not results.empty():
            kind, payload = results.get()
            errors += [payload] if kind == "error" else []
        if errors:  # a rank's FlaxGPTError, raised here again as one line
            raise FlaxGPTError(errors[0]) from None
        raise
    return results.get()[1]


def _spawned(rank, world, init_method, job, results):
    try:
        history = _rank(rank, world, init_method, *job)
    except FlaxGPTError as e:
        results.put(("error", str(e)))
        raise
    if rank == 0:
        results.put(("history", history))


def _rank(rank, world, init_method, config, tc, tensors, stream, out, device, writer_factory,
          loop_options):
    """One rank: join the process group (`init_method`, or torchrun's env://), train, leave."""
    cuda = str(device).startswith("cuda")
    backend = "nccl" if cuda else "gloo"
    if init_method is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world)
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        torch.cuda.set_device(device)
    else:  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        precision.apply(tc.precision)
        trainer = DDPBackend(config, tc, tensors, device=device)
        writer = writer_factory(out) if writer_factory and rank == 0 else None
        history = loop.train(trainer, stream, out, primary=rank == 0, writer=writer,
                             **loop_options)
    finally:
        dist.destroy_process_group()
    return history if rank == 0 else []
