"""flax-gpt bench and flax-gpt compare, end to end on tiny shapes."""

import json

import numpy as np

from flax_gpt.core.config import GPTConfig
from flax_gpt.sidebyside import bench
from tests.conftest import assert_close, assert_same, run_cli
from tests.datasets import prepare_dataset


def test_matmul_params_are_the_linear_layers():
    from torch import nn

    from torch_reference.model import GPT

    config = GPTConfig(vocab_size=50, seq_len=8, d_model=12, n_heads=3, n_layers=2, d_ff=20)
    linear = sum(p.numel() for m in GPT(config).modules() if isinstance(m, nn.Linear)
                 for p in m.parameters())
    assert bench.matmul_params(config) == linear
    assert bench.flops_per_token(config, 8) == 6 * linear + 12 * 2 * 12 * 8
    assert bench.flops_per_token(config, 8, causal=True) == 6 * linear + 6 * 2 * 12 * 8
    assert bench.pad_vocab(11548) == 11584 and bench.pad_vocab(64) == 64


def test_gpt2_matmul_params_are_nanogpts_count_less_the_layer_norms():
    """nanoGPT's N for GPT-2 small: every parameter but the position embedding (the tied
    head counted once, as the token embedding), 123,653,376; ours leaves out the LayerNorms'
    38,400 as well, which do no matmul."""
    from flax_gpt.core import memory

    config = GPTConfig.preset("gpt2")
    layer_norms = (2 * config.n_layers + 1) * 2 * config.d_model
    nanogpt = memory.parameter_count(config) - config.seq_len * config.d_model
    assert nanogpt == 123_653_376
    assert bench.matmul_params(config) == nanogpt - layer_norms == 123_614_976


def test_bench_command_sweeps_batch_sizes(tmp_path):
    result = run_cli("bench", "--preset", "tiny", "--sweep", "batch_size=1,3", "--warmup", "0",
                     "--steps", "2", "--rounds", "2", "--variants", "flax-jit-fp32,torch-eager-fp32",
                     "--json", tmp_path / "b.json", "--plot", tmp_path / "b.png")
    assert result.returncode == 0, result.stderr
    sweep = json.loads((tmp_path / "b.json").read_text())
    assert sweep["complete"] and sweep["batch_sizes"] == [1, 3]
    assert [r["batch_size"] for r in sweep["sweep"]] == [1, 3]
    for report in sweep["sweep"]:
        results = {r["variant"]: r for r in report["results"]}
        assert list(results) == ["flax-jit-fp32", "torch-eager-fp32"]  # nnx.jit: see every-subcommand
        for r in results.values():
            assert r["median_s"] > 0 and r["p10_s"] <= r["median_s"] <= r["p90_s"]
            assert 0 < r["mfu"] < 1 and r["compile_s"] > 0 and r["timed_steps"] == 4
            assert r["tokens_per_s"] > 0
        assert results["flax-jit-fp32"]["peak_memory_bytes"] > 0  # XLA's footprint of the step
        assert results["torch-eager-fp32"]["peak_memory_bytes"] is None  # untracked on CPU
        losses = [r["loss"] for r in results.values()]
        assert_close(losses, losses[0], rtol=0, atol=1e-4)  # the variants computed the same
        assert report["complete"] and report["rounds"] == 2
        assert report["speedup_of"] == "flax-jit-fp32" and results["flax-jit-fp32"]["speedup"] == 1.0
        assert all(r["speedup"] > 0 for r in results.values())
        assert report["config"]["vocab_size"] == 64 and "versions" in report
        assert report["attention"] == "fused"  # the bench's default
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_a_crashed_variant_is_reported_apart_from_a_skipped_one(monkeypatch):
    """A variant that cannot run here is skipped with its reason; one that raises is
    reported too, marked `crashed` (the CLI then exits 1; tests/test_gpu_check.py sees the
    other variants run beside it)."""

    def torch_variant(name, *args):
        if "compile" in name:
            raise bench.Skip("torch.compile unavailable: not on this machine")
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(bench, "torch_variant", torch_variant)
    variants = ["torch-eager-fp32", "torch-compile-fp32"]
    report = bench.bench(GPTConfig.preset("tiny"), batch_size=1, variants=variants, warmup=0,
                         steps=1)
    results = {r["variant"]: r for r in report["results"]}
    assert results["torch-eager-fp32"] == {
        "variant": "torch-eager-fp32", "crashed": True, "skipped": "RuntimeError: broken on purpose"}
    assert "crashed" not in results["torch-compile-fp32"]
    assert results["torch-compile-fp32"]["skipped"].startswith("torch.compile unavailable")
    assert bench.BenchResult([1], [report]).crashed == [
        (1, "torch-eager-fp32", "RuntimeError: broken on purpose")]


def test_bench_reports_after_every_round():
    seen = []
    report = bench.bench(GPTConfig.preset("tiny"), batch_size=1, variants=["flax-jit-fp32"],
                         warmup=0, steps=1, rounds=3, on_round=seen.append)
    assert [r["complete"] for r in seen + [report]] == [False, False, True]
    assert [len(r["results"][0]["round_tokens_per_s"]) for r in seen + [report]] == [1, 2, 3]


def test_bench_unknown_variant_is_one_line():
    result = run_cli("bench", "--variants", "flax-jit-fp64")
    assert result.returncode == 2 and "unknown variant" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_compare_command(tmp_path, shakespeare):
    prepare_dataset([(shakespeare.name, shakespeare.read_bytes()[:100_000])], tmp_path / "ds",
                    max_vocab=96)
    result = run_cli("compare", "--data", tmp_path / "ds", "--preset", "tiny", "--steps", "4",
                     "--batch-size", "4", "--eval-every", "2", "--eval-batches", "2",
                     "--noise-floor", "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["steps"] == 4 and report["max_abs_loss_diff"] <= 1e-5
    assert report["first_step_above"] is None and report["gap_bar"] == 1e-4
    runs = report["frameworks"]
    assert len(runs["flax"]["loss"]) == len(runs["torch"]["loss"]) == len(runs["torch-1ulp"]["loss"]) == 4
    floor = report["noise_floor"]
    assert_same(
        floor["loss_diff"], np.abs(np.subtract(runs["torch"]["loss"], runs["torch-1ulp"]["loss"])))
    assert floor["max_abs_loss_diff"] <= 1e-5  # one ulp stays one ulp's worth over 4 steps
    assert report["unigram_baseline_loss"] > 0 and report["precision"] == "highest"
    assert (tmp_path / "r" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    again = run_cli("compare", "--data", tmp_path / "ds", "--preset", "tiny", "--out", tmp_path / "r")
    assert again.returncode == 2 and "already exists" in again.stderr


def test_nudged_moves_every_weight_one_ulp():
    from flax_gpt.sidebyside.pair import nudged

    tensors = {"a": np.array([0.0, -1.5, 3e-8, 1e30], np.float32), "b": np.ones((2, 3), np.float32)}
    moved = nudged(tensors)
    for name, t in tensors.items():
        assert moved[name].dtype == np.float32 and (moved[name] > t).all()
        assert_same(np.nextafter(moved[name], np.float32(-np.inf)), t)


def test_compare_that_fails_part_way_leaves_nothing(tmp_path, monkeypatch):
    """The Flax run finished, the PyTorch one diverged: no report, and no half-made folder
    that would refuse the same command ("already exists")."""
    import pytest

    from flax_gpt import experiments
    from flax_gpt.core.errors import DivergedError
    from flax_gpt.core.hparams import TrainConfig
    from flax_gpt.sidebyside import compare
    from tests.conftest import FakeBackend

    def backend(framework, config, tc, tensors, device, mesh=None):
        return FakeBackend(config, tc, nan_at=2 if framework == "torch" else None)

    monkeypatch.setattr(experiments, "backend", backend)
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        with pytest.raises(DivergedError, match="step 2"):
            compare.run(GPTConfig.preset("tiny"), TrainConfig(steps=3, batch_size=2), out=out,
                        synthetic=True, eval_every=0)
        assert not out.exists() or list(out.iterdir()) == []
