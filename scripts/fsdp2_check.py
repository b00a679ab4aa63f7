"""Does the installed torch run FSDP2 (`fully_shard`) on gloo, on the CPU? One line of answer.

    python scripts/fsdp2_check.py

Two spawned ranks shard a two-layer toy model with `fully_shard` (torch.distributed.fsdp on
newer torch, torch.distributed._composable.fsdp on 2.3-2.5) and take one AdamW step. README's
FSDP paragraph quotes what each stack printed. The trainer does not use FSDP (README says
what wiring it in would take).
"""

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def fully_shard_api():
    try:
        from torch.distributed.fsdp import fully_shard

        return fully_shard, "torch.distributed.fsdp.fully_shard"
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard

        return fully_shard, "torch.distributed._composable.fsdp.fully_shard"


def rank(r, port, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    try:
        fully_shard, name = fully_shard_api()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss = model(torch.randn(4, 8)).square().mean()
        loss.backward()
        optimizer.step()
        answer = f"torch {torch.__version__}: {name} on gloo/CPU ran an AdamW step"
    except Exception as e:  # the answer is the failure itself, in one line
        answer = (f"torch {torch.__version__}: fully_shard on gloo/CPU failed: "
                  f"{type(e).__name__}: {str(e).splitlines()[0]}")
    finally:
        dist.destroy_process_group()
    if r == 0:
        results.put(answer)


def main():
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(rank, args=(port, results), nprocs=2)
    print(results.get())


if __name__ == "__main__":
    main()
