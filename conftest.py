"""Fixtures shared by tests/ and parity_tests/."""

from pathlib import Path

import pytest

from tests.datasets import corpus_or_stand_in, prepare_dataset

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
