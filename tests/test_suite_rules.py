"""Rules the test suite keeps about itself: a NaN never passes a comparison.

numpy's equality asserts take NaN for equal to NaN (assert_allclose's equal_nan defaults to
True; assert_array_equal and its kin accept NaNs at the same positions), so two runs that both
diverged would pass a comparison of the two frameworks. The suite compares through
tests/conftest.py's assert_close and assert_same, which fail on NaN, and asserts an expected
NaN with np.isnan.
"""

import ast
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_close, assert_same

REPO = Path(__file__).resolve().parents[1]
HELPERS = REPO / "tests" / "conftest.py"
# numpy.testing's asserts that pass where both sides hold a NaN
NAN_EQUAL = {"assert_allclose", "assert_array_equal", "assert_array_almost_equal",
             "assert_almost_equal", "assert_equal", "assert_array_less",
             "assert_array_almost_equal_nulp", "assert_array_max_ulp"}


@pytest.mark.parametrize("check", [
    lambda a, b: assert_close(a, b, rtol=0, atol=1.0),
    lambda a, b: assert_same(a, b),
])
def test_nan_in_both_fails_the_helpers(check):
    check([1.0, 2.0], [1.0, 2.0])  # equal numbers pass
    check(np.array([1, 2]), np.array([1, 2]))  # integers too
    for a, b in (([1.0, np.nan], [1.0, np.nan]), ([np.nan], [1.0]), ([1.0], [np.nan])):
        with pytest.raises(AssertionError):
            check(np.asarray(a), np.asarray(b))


def offences(path):
    """(line, what) of each use of a NaN-equal numpy assert or of equal_nan=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in NAN_EQUAL:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("numpy.testing"):
            found += [(node.lineno, a.name) for a in node.names if a.name in NAN_EQUAL]
        elif (isinstance(node, ast.keyword) and node.arg == "equal_nan"
              and not (isinstance(node.value, ast.Constant) and node.value.value is False)):
            found.append((node.lineno, "equal_nan other than False"))
    return found


def test_the_suite_compares_through_the_helpers():
    files = sorted({*REPO.glob("tests/*.py"), *REPO.glob("parity_tests/*.py")} - {HELPERS})
    assert len(files) > 20
    bad = [f"{path.relative_to(REPO)}:{line}: {what}" for path in files
           for line, what in offences(path)]
    assert not bad, ("NaN == NaN passes these; use tests.conftest.assert_close / assert_same, "
                     f"and np.isnan where NaN is expected: {bad}")
