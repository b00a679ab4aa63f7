"""`python tests/faulty.py ARGS`: `flax-gpt ARGS` with hooks for the fault-injection tests
(tests/test_faults.py), each set by an environment variable:

- STEP_SLEEP: seconds each training step sleeps after it ran, so that a signal sent "after
  step k" lands long before the run's end, however loaded the machine (no numbers change);
- PID_DIR: each PyTorch rank writes its process id to PID_DIR/rank<R> (the launcher
  spawns them: a test finds them there) once it joined;
- KILL_IN_SAVE=STEP:WHO: JAX process (or PyTorch rank) WHO kills itself with SIGKILL in the
  middle of writing checkpoint STEP, after its backend wrote its files into the temporary
  folder, before the folder is checksummed and renamed into place.

The patches are made at import, so the ranks that `--nproc` spawns, which import this file
again as their main module, are patched too.
"""

import os
import signal
import sys
import time

from flax_gpt.cli import main

STEP_SLEEP = float(os.environ.get("STEP_SLEEP", "0"))
KILL_STEP, _, KILL_WHO = os.environ.get("KILL_IN_SAVE", "").partition(":")


def slowed(step):
    def patched(self, index, x, y):
        metrics = step(self, index, x, y)
        time.sleep(STEP_SLEEP)
        return metrics
    return patched


def killing(save, who):
    def patched(self, folder):
        save(self, folder)
        # .step_00000020.tmp, or .step_00000020.<random>.tmp where one process writes alone
        if folder.name.startswith(f".step_{int(KILL_STEP):08d}.") and who(self) == int(KILL_WHO):
            os.kill(os.getpid(), signal.SIGKILL)
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

    backend, who = TorchBackend, lambda self: getattr(self, "rank", 0)
    if "PID_DIR" in os.environ:
        DDPBackend.__init__ = recording(DDPBackend.__init__)
else:
    import jax

    from flax_gpt.train import FlaxBackend

    backend, who = FlaxBackend, lambda self: jax.process_index()
backend.step = slowed(backend.step)
if KILL_STEP:
    backend.save = killing(backend.save, who)

if __name__ == "__main__":
    sys.exit(main())
