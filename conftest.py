"""Fixtures shared by tests/ and parity_tests/, and JAX's compilation cache for the session."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.datasets import corpus_or_stand_in, prepare_dataset  # imports no jax

# Compilation dominates this suite, and the same programs (the tiny train step, the model's
# initialisers) compile in both xdist workers and in every CLI subprocess. JAX's persistent
# compilation cache, one folder per session, lets each be compiled once: the workers and the
# subprocesses inherit the environment, set here before anything imports jax. A cache the
# user set is left alone.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flax_gpt_jax_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made it
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


SHAKESPEARE = Path(__file__).resolve().parent.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare(tmp_path_factory):
    """The corpus from ../shared/data; without it, generated English-like text (a warning),
    or in CI a failure (tests.datasets.corpus_or_stand_in)."""
    return corpus_or_stand_in(SHAKESPEARE, tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def shakespeare_dataset(shakespeare, tmp_path_factory):
    """The corpus prepared once for the whole session, with the stack's implementation."""
    out = tmp_path_factory.mktemp("ds") / "shakespeare"
    prepare_dataset([(shakespeare.name, shakespeare.read_bytes())], out)
    return out
