"""The PyTorch trainer data parallel, one process per rank: DistributedDataParallel, or
FSDP2 (`fully_shard`) with parameters, gradients and AdamW state sharded over the ranks.

    flax-gpt train --framework torch --nproc 2 ...                       # spawns 2 ranks
    flax-gpt train --framework torch --nproc 2 --fsdp ...                # the same, FSDP2
    torchrun --nproc-per-node 2 -m flax_gpt train --framework torch ...  # ranks from torchrun

Every rank reads the same global batch of each step from the stream (batches are addressed
by global index, flax_gpt.core.streams) and feeds only its rows, `rank * B/n` up to
`(rank + 1) * B/n`. DDP averages the gradients over the ranks during backward (gloo on CPU,
NCCL on GPUs), so every rank takes the same AdamW step. The logged loss is the mean of the
ranks' losses (`all_reduce`). Rank 0 alone writes the run folder: metrics, checkpoints and
weights (flax_gpt.core.loop with `primary=False` on the others). Under FSDP every rank
writes its own shards of each checkpoint (torch.distributed.checkpoint), and rank 0 the
gathered canonical weights; such a checkpoint resumes on any number of ranks, one included.

The average of the ranks' mean losses is the mean over the global batch when every rank holds
the same number of labels, which SPEC.md's labels give (seq_len - 1 in every row); a batch
that breaks this is refused rather than averaged wrongly.
"""

import contextlib
import gc
import logging
import os
import signal
import socket
import sys
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException, ProcessExitedException
from torch.nn.parallel import DistributedDataParallel

from flax_gpt.core import loop, runfolder, weights
from flax_gpt.core.data import IGNORE_INDEX
from flax_gpt.core.errors import FlaxGPTError, Interrupted
from torch_reference import precision
from torch_reference.train import TorchBackend, TrainStep


class DDPBackend(TorchBackend):
    """TorchBackend on one rank of a process group: the model wrapped in DDP for the train
    step, each global batch cut to this rank's rows, the loss averaged over the ranks."""

    collective = False  # every rank holds the whole state: rank 0 alone writes checkpoints

    def __init__(self, config, tc, tensors=None, *, device="cpu"):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_batch(tc.batch_size, self.world)
        super().__init__(config, tc, tensors, device=device)
        self.train_step = TrainStep(self.parallel(self.model), tc, device=device)

    @staticmethod
    def parallel(model):
        """`model` as the train step runs it."""
        ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters
        ddp.config = model.config  # what TrainStep reads from its model
        return ddp

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

    def check_finite(self):
        """Raise NonFiniteError naming the first canonical tensor that holds NaN or Inf, as
        weights.save would, on every rank alike (a collective): each rank counts what it
        holds, and the counts are summed over the shards of FSDP, or the largest taken of
        DDP's replicas."""
        held = self.model.state_dict()  # canonical names; DTensors of local shards under FSDP
        counts = torch.stack([(~torch.isfinite(getattr(t, "to_local", lambda: t)())).sum()
                              for t in held.values()])
        dist.all_reduce(counts, op=dist.ReduceOp.SUM if self.collective else dist.ReduceOp.MAX)
        weights.refuse_nonfinite(zip(held, counts.tolist()))

    def fetch(self, metrics):
        """The metrics of one step: the loss averaged over the ranks (a collective, which every
        rank's loop reaches at the same step); the gradient norm is already the global one."""
        loss = metrics["loss"].detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.SUM)
        return {"loss": float(loss) / self.world, "grad_norm": float(metrics["grad_norm"])}


class FSDPBackend(DDPBackend):
    """DDPBackend with the model under FSDP2: each parameter, its gradient and its AdamW
    moments split by rows over the ranks (DTensors), each decoder layer's gathered just
    before it runs. The gradients are reduce-scattered and averaged as DDP averages them,
    and the clipping norm of TrainStep sums the shards' squares over the ranks."""

    collective = True  # checkpoints are written by every rank (runfolder.save_checkpoint)

    @staticmethod
    def parallel(model):
        from torch.distributed.fsdp import fully_shard

        # FSDP warns that the model returns a view (the logits of nn.Linear on (B, T, d)),
        # whose in-place change would skip its backward hook; the loss reads them out of place
        warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(\w+\) returned a view")
        for layer in model.decoder.layers:
            fully_shard(layer)
        fully_shard(model)  # the rest: embedding and prediction head
        return model

    @staticmethod
    def barrier(name):
        dist.barrier()

    def canonical(self):
        """The canonical tensors, gathered on rank 0 (a collective; the others get {})."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        whole = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {name: t.numpy() for name, t in whole.items()}

    def save(self, folder):
        """Every rank its own shards into runfolder.SHARDED; rank 0 the canonical weights."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self.state_dicts(), checkpoint_id=str(folder / runfolder.SHARDED))
        tensors = self.canonical()
        if self.rank == 0:
            weights.save(folder / runfolder.WEIGHTS, self.config, tensors)

    def load(self, folder):
        if (folder / runfolder.SHARDED).is_dir():
            return super().load(folder)
        # a checkpoint of one process or DDP: loaded whole here, then split by FSDP's own
        # full-state-dict loaders
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        whole = TorchBackend(self.config, self.tc, device=self.device)
        whole.load(folder)
        self.set_state_dicts(whole.state_dicts(), StateDictOptions(full_state_dict=True))


class RankStop(loop.LocalStop):
    """When the ranks stop for a signal (flax_gpt.core.loop.LocalStop's multi-rank twin):
    after every step they sum, over a gloo group of their own (host memory, on NCCL runs
    too), the signal each received since, so a signal to any one rank stops them all after
    the same step. `forwarded`: a shared value where the launcher of spawned ranks leaves
    the signal it passed on to them (see _forwarded); rank 0 reads it, and whether the
    launcher is still its parent, into the same sum, so that every rank says the same."""

    def __init__(self, forwarded=None):
        super().__init__()
        self.group = dist.new_group(backend="gloo")  # a collective: every rank makes it
        self.forwarded, self.launcher = forwarded, os.getppid()

    def agreed(self, step):
        world, rank = dist.get_world_size(), dist.get_rank()
        votes = torch.zeros(world + 2, dtype=torch.int32)  # each rank's, then the launcher's
        votes[rank] = self.signum
        if rank == 0 and self.forwarded is not None:
            votes[world] = self.forwarded.value
            votes[world + 1] = os.getppid() != self.launcher  # its death sends SIGINT (spawn)
        dist.all_reduce(votes, group=self.group)
        told = torch.nonzero(votes[:world]).flatten().tolist()
        if not told:
            return None
        if votes[world + 1]:
            return int(votes[told[0]]), "its launcher died"
        if votes[world]:
            return int(votes[world]), "sent to the launcher"
        return int(votes[told[0]]), f"sent to rank {told[0]}"


def check(batch_size, ranks, fsdp=False, torchrun=True):
    """Refuse (FlaxGPTError, one line) a run on `ranks` ranks that could not start, before
    any does: --fsdp on one rank or on a torch without FSDP2, a batch that does not split.
    `torchrun`: the command may also run under torchrun (train; compare may not)."""
    if fsdp and ranks < 2:
        raise FlaxGPTError("--fsdp shards over several ranks: give --nproc N (N > 1)" +
                           " or start the ranks with torchrun" * torchrun)
    check_batch(batch_size, ranks)
    if fsdp:
        check_fsdp()


def check_fsdp():
    """Refuse --fsdp (FlaxGPTError) where the installed torch has no FSDP2."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        raise FlaxGPTError(f"--fsdp needs FSDP2, torch.distributed.fsdp.fully_shard (torch 2.6 "
                           f"and newer), which torch {torch.__version__} lacks: train data "
                           f"parallel without --fsdp, or install a newer torch") from None


def check_batch(batch_size, world):
    if batch_size % world:
        raise FlaxGPTError(f"--batch-size {batch_size} does not split over --nproc {world} "
                           f"ranks: make it a multiple of {world}")


def under_torchrun():
    """True in a process that torchrun started as one rank of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def train(nproc, config, tc, stream, out, tensors=None, *, device="cpu", writer_factory=None,
          fsdp=False, **loop_options):
    """Train on `nproc` spawned ranks, or on the ranks torchrun started (`nproc` None), with
    flax_gpt.core.loop.train's `loop_options`; with `fsdp`, under FSDP2 (FSDPBackend), else
    DDP. `writer_factory(out)`: rank 0's metrics sink (TensorBoard), made in that process.
    Returns rank 0's history ([] on torchrun's others)."""
    check(tc.batch_size, nproc or int(os.environ["WORLD_SIZE"]), fsdp)
    job = (config, tc, tensors, stream, out, device, writer_factory, fsdp, loop_options)
    if nproc is None:
        return _rank(None, None, None, None, *job)
    with socket.socket() as s:  # a free port for the rendezvous of this run's ranks
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    results, forwarded = context.SimpleQueue(), context.Value("i", 0)
    # once a rank failed, spawn terminates the others with a warning line each: the failure
    # is reported below, in one line
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")
    level = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        ranks = mp.spawn(_spawned, args=(nproc, f"tcp://127.0.0.1:{port}", forwarded, job,
                                         results), nprocs=nproc, join=False)
        with _forwarded(signal.SIGINT, signal.SIGTERM, to=ranks.processes, record=forwarded):
            while not ranks.join():
                pass
    except ProcessException as e:
        errors = [payload for kind, payload in _drain(results) if kind == "error"]
        if errors:  # a rank's FlaxGPTError, raised here again as one line
            raise FlaxGPTError(errors[0]) from None
        if forwarded.value and getattr(e, "signal_name", None) == signal.Signals(forwarded.value).name:
            # the signal reached a rank before it could take it (starting Python)
            print(f"interrupted by {e.signal_name} before the ranks were training; "
                  f"{runfolder.how_to_continue(out)}", file=sys.stderr)
            raise Interrupted(forwarded.value) from None
        if isinstance(e, ProcessExitedException):  # killed, or out of memory: not a bug here
            raise FlaxGPTError(f"{e.msg.strip().replace('process', 'rank', 1)}; "
                               f"{runfolder.how_to_continue(out)}") from None
        raise
    finally:
        spawn_log.setLevel(level)
    returned = dict(_drain(results))
    if "interrupted" in returned:  # rank 0 said where the ranks stopped
        raise Interrupted(returned["interrupted"])
    return returned["history"]


def _drain(results):
    while not results.empty():
        yield results.get()


@contextlib.contextmanager
def _forwarded(*signals, to, record):
    """The launcher passes `signals` on to the ranks (processes `to`), which stop together
    at a step boundary (RankStop): SIGTERM from a scheduler may reach the launcher alone.
    The first one passed on is left in `record` (a shared multiprocessing Value)."""
    def forward(signum, _):
        record.value = record.value or signum
        for process in to:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signum)

    previous = {s: signal.signal(s, forward) for s in signals}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _spawned(rank, world, init_method, forwarded, job, results):
    try:
        history = _rank(rank, world, init_method, forwarded, *job)
    except FlaxGPTError as e:
        results.put(("error", str(e)))
        raise
    except Interrupted as e:  # a stop every rank agreed to: this rank ends without a fault
        results.put(("interrupted", e.signum))
        return
    except KeyboardInterrupt:  # Ctrl-C before the rank took signals: it dies of it, quietly
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.raise_signal(signal.SIGINT)
    if rank == 0:
        results.put(("history", history))


def _rank(rank, world, init_method, forwarded, config, tc, tensors, stream, out, device,
          writer_factory, fsdp, loop_options):
    """One rank: join the process group (`init_method`, or torchrun's env://), train, leave.
    `forwarded`: see RankStop."""
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
    # From here to the end a signal never kills a rank mid-collective: one that comes before
    # training stops the ranks after its first step, one that comes after it is ignored
    stop, trainer = RankStop(forwarded), None
    with loop.signals_to(stop):
        try:
            precision.apply(tc.precision)
            trainer = (FSDPBackend if fsdp else DDPBackend)(config, tc, tensors, device=device)
            writer = writer_factory(out) if writer_factory and rank == 0 else None
            stopped = None
            try:
                history = loop.train(trainer, stream, out, primary=rank == 0, writer=writer,
                                     stop=stop, **loop_options)
            except (FlaxGPTError, Interrupted) as e:  # met alike by every rank
                stopped = e
            dist.barrier()  # no rank tears its gloo threads down while another still talks
            if stopped:
                raise stopped
        finally:
            # DDP's reducer holds the process group: dropped first, or its destructor joins
            # the group's threads at exit, after the peer has gone (the hang at exit of issue 21)
            del trainer
            gc.collect()
            dist.destroy_process_group()
    return history if rank == 0 else []
