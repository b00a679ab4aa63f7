import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, env=None):
    """Run `python -m flax_gpt ARGS` in a subprocess; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "flax_gpt", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=REPO, timeout=600)


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
