"""Fixtures shared by tests/ and parity_tests/."""

from pathlib import Path

import pytest

SHAKESPEARE = Path(__file__).resolve().parent.parent / "shared" / "data" / "tinyshakespeare.txt"


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
