"""`python tests/faulty.py ARGS`: `flax-gpt ARGS` with hooks for the fault-injection tests
(tests/test_faults.py), each set by an environment variable:

- STEP_SLEEP: seconds each training step sleeps after it ran, so that a signal sent "after
  step k" lands long before the run's end, however loaded the machine (no numbers change);
- PID_DIR: each PyTorch rank writes its process id to PID_DIR/rank<R> (the launcher
  spawns them: a test finds them there) once it joined;
- FAULT=KIND:STEP:WHO: JAX process (or PyTorch rank) WHO, at step STEP (1-based), with KIND
  - kill-after-step: kills itself with SIGKILL right after the step;
  - raise-after-step: raises RuntimeError (a bug) right after the step;
  - kill-in-save: kills itself with SIGKILL in the middle of writing checkpoint STEP, after
    its backend wrote its files into the temporary folder, before the folder is checksummed
    and renamed into place.

The patches are made at import, so the ranks that `--nproc` spawns, which import this file
again as their main module, are patched too.
"""

import os
import signal
import sys
import time

from flax_gpt.cli import main

STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0"))
KIND, STEP, WHO = (os.environ["FAULT"].split(":") if "FAULT" in os.environ else ("", "0", "0"))
STEP, WHO = int(STEP), int(WHO)


def fault():
    if KIND == "raise-after-step":
        raise RuntimeError(f"a fault planted after step {STEP}")
    os.kill(os.getpid(), signal.SIGKILL)


def stepping(step, who, finish):
    def patched(self, index, x, y):
        metrics = step(self, index, x, y)
        time.sleep(STEP_SLEEP)
        if KIND.endswith("-after-step") and index + 1 == STEP and who(self) == WHO:
            finish(metrics)  # the step done, not only dispatched
            fault()
        return metrics
    return patched


def saving(save, who):
    def patched(self, folder):
        save(self, folder)
        # .step_00000020.tmp, or .step_00000020.<random>.tmp where one process writes alone
        if KIND == "kill-in-save" and folder.name.startswith(f".step_{STEP:08d}.") \
                and who(self) == WHO:
            fault()
    return patched


def recording(init):
    def patched(self, *args, **kwargs):
        init(self, *args, **kwargs)
        path = os.path.join(os.environ["PID_DIR"], f"rank{self.rank}")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)  # whole, or not there
    return patched


if "torch" in sys.argv:
    from torch_reference.distributed import DDPBackend
    from torch_reference.train import TorchBackend

    # eager on the CPU: a step is done when it returns
    backend, who, finish = TorchBackend, lambda self: getattr(self, "rank", 0), lambda _: None
    if "PID_DIR" in os.environ:
        DDPBackend.__init__ = recording(DDPBackend.__init__)
else:
    import jax

    from flax_gpt.train import FlaxBackend

    backend, who, finish = FlaxBackend, lambda self: jax.process_index(), jax.block_until_ready
backend.step = stepping(backend.step, who, finish)
backend.save = saving(backend.save, who)

if __name__ == "__main__":
    sys.exit(main())
