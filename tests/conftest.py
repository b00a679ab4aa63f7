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
