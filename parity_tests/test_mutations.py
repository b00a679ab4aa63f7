"""The mutation catalogue in the suite (parity_tests/mutations.py): each planted bug, in the
first of the tiers it must be caught in, fails the comparison and is located where it is.

One test per mutation, so that xdist spreads them. Ordered so that compiled functions are
shared: PyTorch and numpy bugs first (they keep every JAX compilation), then the bugs in
code JAX traces, each of which clears JAX's caches around itself.
"""

import pytest
import torch

from flax_gpt.sidebyside import pair
from parity_tests import mutations
from parity_tests.mutations import DECODE, SHARED, MUTATIONS, REFERENCE


def order(m):
    return (m.retrace or m.harness is not None, m.tiers[0] != "highest", m.kind == SHARED)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """PyTorch on one thread for this module: its models are tiny, and its idle threads spin
    (on a busy 2-core machine a backward of `tiny` took 0.3 s with two threads, and the
    module twice its single-thread time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def no_persistent_cache_reads(old_jaxlib_cache_guard):
    """See parity_tests/conftest.py: old_jaxlib_cache_guard."""


@pytest.fixture(autouse=True)
def highest_after():
    """The suite's float32 `highest` after each test (a mutation leaves its tier set)."""
    yield
    pair.apply_precision("highest")


def test_the_catalogue_covers_every_kind():
    """At least 15 distinct bugs, in both frameworks and the shared core, of every kind."""
    assert len(MUTATIONS) >= 15 and len({m.name for m in MUTATIONS}) == len(MUTATIONS)
    assert {m.patch.framework for m in MUTATIONS} >= {"flax", "torch", "core"}
    assert {m.kind for m in MUTATIONS} == {mutations.FORWARD, mutations.TRAINING, DECODE, SHARED}


def test_a_wrong_place_is_not_located():
    """The location check itself: a wrong layer, a step before the bug can act, a tensor of
    the wrong kind, or a part the bug cannot reach named, each fails it."""
    located = mutations.is_located
    assert located({"forward": "layer 1 output"}, (), {"forward": "layer 1 output", "backward": "x"})
    assert not located({"forward": "layer 1 output"}, (), {"forward": "layer 0 output"})
    assert not located({"forward": "layer 1 output"}, (), {})
    assert located({"training_step": mutations.NoEarlierThan(2)}, (), {"training_step": 4})
    assert not located({"training_step": mutations.NoEarlierThan(2)}, (), {"training_step": 1})
    undecayed = {"trained_tensor": mutations.Matching(mutations.UNDECAYED)}
    assert located(undecayed, (), {"trained_tensor": "decoder.layers.0.layer_norm1.weight"})
    assert not located(undecayed, (), {"trained_tensor": "decoder.layers.0.ffn.fc1.weight"})
    assert not located({"training_step": 2}, ("forward",), {"training_step": 2, "forward": "logits"})


def test_float64_sees_an_attention_scale_change_that_float32_cannot():
    """Issue 20's expectation, measured: the q and k gradients move by exactly the relative
    change of the scale, so float64 (gradient tolerance 1e-11) sees 1e-10 and float32
    `highest` (1e-5) sees 1e-3; below 2**-24 float32 cannot even hold the changed scale.
    (First in the module: it compiles the forward both tiers' tests use.)"""
    points = {(p.size, p.tier): p for p in mutations.size_sweep(["attention scale"], sizes=(1e-3, 1e-10))}
    tiny = points[1e-10, "float64"]
    assert tiny.caught and tiny.divergence.get("gradient_tensor", "").endswith(("mhma.q.weight", "mhma.k.weight"))
    assert not points[1e-10, "highest"].caught and not points[1e-10, "highest"].float32_distinct
    assert points[1e-3, "highest"].caught


@pytest.mark.parametrize("name", [m.name for m in sorted(MUTATIONS, key=order)])
def test_mutation_is_caught_and_located(name):
    m = mutations.BY_NAME[name]
    tier = m.tiers[0]
    o = mutations.check(m, tier)
    assert o.caught, f"{name} not caught in {tier}: {o.details}"
    assert o.located, f"{name} in {tier}: divergence {o.divergence}, expected {o.expected}, failed {o.failed}"
    if m.harness:  # the comparison the harness builds passes on correct code
        assert o.details["control_passed"], o.details["control_failed"]
    if m.kind == DECODE:  # training and forward parity never read the cache
        assert o.details["forward_parity_passed"]
    if tier == REFERENCE:  # shared code: the two frameworks agree with each other all along
        assert not o.details["framework_failures"], o.details["framework_failures"]
