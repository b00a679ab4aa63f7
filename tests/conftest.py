import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORDS = ("the king queen lord speak hear me my thy good night day love death sword crown "
         "england france war peace").split()


def text(lines, seed):
    """`lines` lines of random WORDS, seeded: a corpus for tests that need no real text."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return "".join(" ".join(rng.choice(WORDS, rng.integers(3, 10))) + " .\n" for _ in range(lines))


def assert_close(actual, desired, *, rtol, atol, err_msg=""):
    """np.testing.assert_allclose where NaN never passes: numpy's default (equal_nan=True)
    takes a NaN on both sides for agreement, so two runs that both diverged would match.
    Where NaN is the expected result, assert it with np.isnan."""
    import numpy as np

    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol, equal_nan=False,
                               err_msg=err_msg)


def assert_same(actual, desired, err_msg=""):
    """np.testing.assert_array_equal where NaN never passes (numpy takes NaNs at the same
    positions for equal)."""
    import numpy as np

    np.testing.assert_array_equal(actual, desired, err_msg=err_msg)
    actual = np.asarray(actual)
    if np.issubdtype(actual.dtype, np.inexact):
        assert not np.isnan(actual).any(), f"NaN in both: {err_msg}"


def run_cli(*args, env=None, cwd=None):
    """Run `python -m flax_gpt ARGS` in a subprocess (in the repository, or `cwd` with the
    repository on the path); return the CompletedProcess."""
    env = {**os.environ, **(env or {})}
    if cwd is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "flax_gpt", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd or REPO, timeout=600)


_IN_ONE_PROCESS = """
import contextlib, io, json, sys, traceback
from flax_gpt.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        except BaseException:  # what would have been a traceback: exit 1, as the process would
            traceback.print_exc()
            code = 1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def has_fsdp2():
    """Whether the installed torch has FSDP2 (`--fsdp` refuses to run without it)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def run_cli_many(*commands, env=None):
    """Run the CLI commands (each a list of arguments) one after the other in one Python
    subprocess, through flax_gpt.cli.main: where each would pay the interpreter, the imports
    and JAX's compilations again, they share them. Returns one SimpleNamespace(returncode,
    stdout, stderr) per command."""
    from types import SimpleNamespace

    argvs = json.dumps([[str(a) for a in command] for command in commands])
    done = subprocess.run([sys.executable, "-c", _IN_ONE_PROCESS, argvs], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [SimpleNamespace(**r) for r in json.loads(done.stdout.splitlines()[-1])]


def run_cli_here(*args):
    """Run `flax_gpt.cli.main(ARGS)` in this process and return what run_cli returns
    (returncode, stdout, stderr). A new process costs seconds of imports, and every jitted
    function compiles afresh in it; here commands that use one model shape share the
    compiled prefill and decode steps. The precision and thread settings a command changes
    (x64 mode, matmul precision, PyTorch's threads) are put back so that later tests in this
    process see what they saw before."""
    import jax
    import torch

    from flax_gpt import cli

    saved = (jax.config.jax_enable_x64, jax.config.jax_default_matmul_precision,
             torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.get_num_threads())
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                returncode = cli.main([str(a) for a in args])
            except SystemExit as e:  # argparse refuses bad options by exiting
                returncode = e.code
    finally:
        jax.config.update("jax_enable_x64", saved[0])
        jax.config.update("jax_default_matmul_precision", saved[1])
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cudnn.allow_tf32 = saved[3]
        torch.set_num_threads(saved[4])
    return subprocess.CompletedProcess(args, returncode, stdout.getvalue(), stderr.getvalue())


class FakeBackend:
    """core.loop's backend interface with no framework, for fast tests of the loop and the run
    folder: the loss of step s is 1 / s (NaN at step `nan_at`), the weights fixed random
    tensors, which turn NaN from step `bad_weights_at` on."""

    name = "flax"  # its run folders read as the Flax trainer's

    def __init__(self, config, tc, *, nan_at=None, bad_weights_at=None):
        import numpy as np

        from flax_gpt.core.weights import canonical_shapes

        self.config, self.tc, self.nan_at, self.bad_weights_at = config, tc, nan_at, bad_weights_at
        rng = np.random.default_rng(0)
        self.tensors = {name: rng.standard_normal(shape).astype(np.float32)
                        for name, shape in canonical_shapes(config).items()}
        self.steps = []

    def step(self, index, x, y):
        self.steps.append(index)
        if self.bad_weights_at and index + 1 >= self.bad_weights_at:
            self.tensors = {k: v * float("nan") for k, v in self.tensors.items()}
        return {"loss": float("nan") if index + 1 == self.nan_at else 1.0 / (index + 1),
                "grad_norm": 1.0}

    @staticmethod
    def fetch(metrics):
        return dict(metrics)

    def lr(self, index):
        return 1e-3

    def eval_loss(self, x, y):
        return 2.0

    def canonical(self):
        return self.tensors

    def save(self, folder):
        from flax_gpt.core import runfolder, weights

        weights.save(folder / runfolder.WEIGHTS, self.config, self.tensors)

    def load(self, folder):
        from flax_gpt.core import runfolder

        self.tensors = runfolder.checkpoint_weights(folder, self.config)
