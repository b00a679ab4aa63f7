import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not found (tests read the corpus from ../shared/data)")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def shakespeare_dataset(shakespeare, tmp_path_factory):
    """tinyshakespeare prepared once for the whole session."""
    from flax_gpt import prepare

    out = tmp_path_factory.mktemp("ds") / "shakespeare"
    prepare.prepare([(shakespeare.name, shakespeare.read_bytes())], out)
    return out


def run_cli(*args, env=None):
    """Run `python -m flax_gpt ARGS` in a subprocess; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "flax_gpt", *map(str, args)],
                          capture_output=True, text=True, env={**os.environ, **(env or {})},
                          cwd=REPO, timeout=600)
