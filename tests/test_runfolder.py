"""A run folder that cannot lie, the settings a run refuses, memory, and what a user sees:
through core.loop with a framework-free backend (tests.conftest.FakeBackend), so no test here
compiles anything."""

import fcntl
import json
import math
import shutil

import numpy as np
import pytest

from flax_gpt.core import loop, memory, runfolder, weights
from flax_gpt.core.config import GPT2, ConfigError, GPTConfig
from flax_gpt.core.data import TokenDataset
from flax_gpt.core.errors import (CheckpointError, DatasetError, DivergedError, NonFiniteError, WeightsError)
from flax_gpt.core.hparams import TrainConfig, check_sampling
from flax_gpt.core.sharding import MeshShape, per_device_elements
from flax_gpt.core.streams import DatasetStream
from tests.conftest import FakeBackend, text
from tests.datasets import prepare_dataset

CONFIG = GPTConfig.preset("tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("rf") / "ds"
    prepare_dataset([("text.txt", text(400, 0).encode())], out)
    return out


def make(data, steps=6, batch_size=4, **fake):
    ds = TokenDataset.load(data)
    config = CONFIG.replace(vocab_size=ds.vocab_size)
    tc = TrainConfig(steps=steps, batch_size=batch_size)
    return FakeBackend(config, tc, **fake), DatasetStream(ds, batch_size, config.seq_len, 0)


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / runfolder.METRICS).read_text().splitlines()]


# ---- settings: finite and in range, refused before anything is built ----------------------

@pytest.mark.parametrize("changes,message", [
    ({"lr": math.nan}, "lr must be a finite number"),
    ({"lr": math.inf}, "lr must be a finite number"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"grad_clip": math.nan}, "grad_clip must be a finite number"),
    ({"min_lr_ratio": -1.0}, "min_lr_ratio must be >= 0 and <= 1"),
    ({"weight_decay": -5.0}, "weight_decay must be >= 0"),
    ({"beta2": 1.0}, "beta2 must be >= 0 and < 1"),
    ({"eps": math.inf}, "eps must be a finite number"),
    ({"warmup_steps": -1}, "warmup_steps must be >= 0"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"precision": "fp8"}, "unknown precision 'fp8'"),
])
def test_train_config_refuses_bad_settings(changes, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**changes)


@pytest.mark.parametrize("changes,message", [
    ({"dropout": math.nan}, "dropout must be a finite number"),
    ({"dropout": "0.1"}, "dropout must be a number"),
    ({"layer_norm_eps": math.inf}, "layer_norm_eps must be a finite number"),
    ({"seq_len": True}, "seq_len must be an integer"),
])
def test_model_config_refuses_bad_fields(changes, message):
    with pytest.raises(ConfigError, match=message):
        CONFIG.replace(**changes)


@pytest.mark.parametrize("args,message", [
    ((10, math.nan, 0, 0), "temperature must be a finite number"),
    ((10, math.inf, 0, 0), "temperature must be a finite number"),
    ((10, 1.0, -1, 0), "top_k must be >= 0"),
    ((0, 1.0, 0, 0), "max_new_tokens must be >= 1"),
    ((10, 1.0, 0, -3), "seed must be >= 0"),
])
def test_sampling_settings_are_checked(args, message):
    with pytest.raises(ConfigError, match=message):
        check_sampling(*args)


@pytest.mark.parametrize("options,message", [
    ({"eval_batches": -1}, "eval_batches must be >= 0"),
    ({"eval_every": -1}, "eval_every must be >= 0"),
    ({"checkpoint_every": -2}, "checkpoint_every must be >= 0"),
    ({"keep": 0}, "keep must be >= 1"),
    ({"stop_at": 7}, "stop_at must be >= 1 and <= 6"),
])
def test_loop_options_are_checked_before_the_folder(dataset, tmp_path, options, message):
    backend, stream = make(dataset)
    with pytest.raises(ConfigError, match=message):
        loop.train(backend, stream, tmp_path / "run", **options)
    assert not (tmp_path / "run").exists() and backend.steps == []


# ---- the dataset, checked before step 0 --------------------------------------------------------

def test_split_too_small_is_refused_before_step_0(dataset, tmp_path):
    """The validation split cannot fill one batch of 32 rows: found before training, not at
    the first evaluation after it, and no run folder is left to block the retry."""
    backend, stream = make(dataset, batch_size=32)
    with pytest.raises(DatasetError, match="the val split has .* fewer than batch_size 32"):
        loop.train(backend, stream, tmp_path / "run", eval_every=2)
    assert backend.steps == [] and not (tmp_path / "run").exists()


# ---- divergence -----------------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    backend, stream = make(dataset, nan_at=5)
    with pytest.raises(DivergedError, match="step 5: the loss is nan.*last good checkpoint, step 4"):
        loop.train(backend, stream, tmp_path / "run", checkpoint_every=2, log_every=3)
    assert [p.name for p in runfolder.checkpoints(tmp_path / "run")] == [
        "step_00000002", "step_00000004"]
    assert logged_steps(tmp_path / "run") == [1, 2, 3, 4]
    weights.load(tmp_path / "run" / runfolder.WEIGHTS)  # the latest weights are the good ones


def test_non_finite_weights_are_never_checkpointed(dataset, tmp_path):
    """The weights turn NaN in the last step while its loss is still finite."""
    backend, stream = make(dataset, bad_weights_at=6)
    with pytest.raises(DivergedError, match="step 6: the weights hold NaN or Inf"):
        loop.train(backend, stream, tmp_path / "run", checkpoint_every=2)
    assert runfolder.checkpoints(tmp_path / "run")[-1].name == "step_00000004"
    assert not list((tmp_path / "run" / runfolder.CHECKPOINTS).glob(".*"))


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(dataset, tmp_path):
    backend, stream = make(dataset, nan_at=2)
    with pytest.raises(DivergedError, match="no checkpoint was written"):
        loop.train(backend, stream, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    loop.train(*make(dataset), tmp_path / "run")  # the same command again just works


def test_a_run_killed_before_its_first_checkpoint_can_be_started_again(dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(*make(dataset), run, stop_at=3)
    shutil.rmtree(run / runfolder.CHECKPOINTS)  # what kill -9 in the first steps leaves
    (run / runfolder.WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint to resume from.*without --resume"):
        loop.train(*make(dataset), run, resume=True)
    loop.train(*make(dataset), run)
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]


# ---- resume: what a killed process left, the data by its sha256, the schedule -------------------

def test_resume_cleans_leftovers_and_does_not_repeat_metrics(dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(*make(dataset), run, stop_at=3, log_every=1)
    # kill -9 in the middle of step 5's checkpoint, after metrics for 4 and half of 5
    (run / runfolder.CHECKPOINTS / ".step_00000005.x1y2.tmp").mkdir()
    (run / ".weights.safetensors.a1b2.tmp").write_bytes(b"half")
    with open(run / runfolder.METRICS, "a") as f:
        f.write('{"step": 4, "loss": 0.25}\n{"step": 5, "lo')
    backend, stream = make(dataset)
    loop.train(backend, stream, run, resume=True, log_every=1)
    assert backend.steps == [3, 4, 5]
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / runfolder.CHECKPOINTS).iterdir()) == [
        "step_00000003", "step_00000006"]
    assert not list(run.glob(".*.tmp")) and not list((run / runfolder.CHECKPOINTS).glob(".*"))


def test_the_dataset_is_stored_resolved_and_known_by_its_sha256(dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(dataset.parent)
    ds = TokenDataset.load(dataset.name)  # typed relative
    config = CONFIG.replace(vocab_size=ds.vocab_size)
    tc = TrainConfig(steps=6, batch_size=4)
    run = tmp_path / "run"
    loop.train(FakeBackend(config, tc), DatasetStream(ds, 4, 16, 0), run, stop_at=3)
    record = runfolder.read_record(run)
    assert record["data"]["path"] == str(dataset.resolve())
    monkeypatch.chdir(tmp_path)
    assert runfolder.run_dataset(record).path == dataset.resolve()  # from another folder
    link = tmp_path / "same-data"
    link.symlink_to(dataset)  # the same data spelled another way resumes
    ds = TokenDataset.load(link)
    loop.train(FakeBackend(config, tc), DatasetStream(ds, 4, 16, 0), run, resume=True)
    assert logged_steps(run)[-1] == 6


def test_dataset_prepared_again_in_place_is_refused(dataset, tmp_path):
    data = shutil.copytree(dataset, tmp_path / "ds")
    run = tmp_path / "run"
    loop.train(*make(data), run)
    record = runfolder.read_record(run)
    assert runfolder.run_dataset(record).vocab_size == record["model"]["vocab_size"]
    prepare_dataset([("other.txt", text(300, 1).encode())], data, force=True)
    with pytest.raises(DatasetError, match="has changed since this run trained on it"):
        runfolder.run_dataset(record)
    with pytest.raises(CheckpointError, match="it trained on the dataset"):
        loop.train(*make(data), run, resume=True)


def test_resume_with_another_steps_is_refused_with_the_saved_value(dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(*make(dataset), run, stop_at=3)
    with pytest.raises(CheckpointError, match="started with --steps 6, not 12.*--stop-at"):
        loop.train(*make(dataset, steps=12), run, resume=True)
    with pytest.raises(CheckpointError, match=r"settings differ .*batch_size 4 -> 8"):
        loop.train(*make(dataset, batch_size=8), run, resume=True)
    loop.train(*make(dataset), run, resume=True, stop_at=4)  # --stop-at splits a run
    with pytest.raises(CheckpointError, match="already at step 4: pass a larger --stop-at"):
        loop.train(*make(dataset), run, resume=True, stop_at=4)


def test_two_processes_cannot_write_one_run_folder(dataset, tmp_path):
    run = tmp_path / "run"
    loop.train(*make(dataset), run, stop_at=3)
    with open(run / runfolder.LOCK, "a") as held:  # another process holds the lock
        fcntl.flock(held, fcntl.LOCK_EX)
        backend, stream = make(dataset)
        with pytest.raises(CheckpointError, match="in use by another process"):
            loop.train(backend, stream, run, resume=True)
        assert backend.steps == []
    loop.train(*make(dataset), run, resume=True)  # released: goes on
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("resume", [True, False])
def test_a_run_being_written_is_refused_as_such_before_its_first_checkpoint(dataset, tmp_path, resume):
    """Before: --resume said "no checkpoint to resume from ... run it without --resume", and
    without it "already exists: pass --resume", while the first run was still going."""
    run = tmp_path / "run"
    with runfolder.open_run(run, *make(dataset), resume=False):  # another run, before step 1
        backend, stream = make(dataset)
        with pytest.raises(CheckpointError, match="in use by another process"):
            loop.train(backend, stream, run, resume=resume)
        assert backend.steps == []


def test_config_json_that_is_not_a_run_record_is_one_clear_error(tmp_path):
    for content, message in [("{}", "has no 'framework' entry"), ("[]", "is not a JSON object"),
                             ("{", "is unreadable"), (b"\xff", "is unreadable")]:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        path = run / runfolder.CONFIG
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(CheckpointError, match=message):
            runfolder.read_record(run)


# ---- weights ----------------------------------------------------------------------------------------

def test_non_finite_weights_are_refused_unless_asked(tmp_path):
    tensors = FakeBackend(CONFIG, TrainConfig()).tensors
    bad = {**tensors, "pred.bias": np.where(np.arange(64) == 3, np.inf, 0).astype(np.float32)}
    path = tmp_path / "w.safetensors"
    with pytest.raises(NonFiniteError, match="'pred.bias' holds 1 NaN or Inf"):
        weights.save(path, CONFIG, bad)
    assert not path.exists()
    weights.save(path, CONFIG, bad, allow_nonfinite=True)
    with pytest.raises(WeightsError, match="'pred.bias' holds 1 NaN or Inf"):
        weights.load(path)
    config, loaded = weights.load(path, allow_nonfinite=True)
    assert np.isinf(loaded["pred.bias"][3])


@pytest.mark.parametrize("header", [b"[1, 2, 3]", b'{"__metadata__": [1]}', b'"text"',
                                    b'{"__metadata__": {"config": 5}}'])
def test_safetensors_header_of_another_shape_is_a_weights_error(tmp_path, header):
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        weights.load(path)


# ---- memory -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [CONFIG, GPTConfig(vocab_size=50, seq_len=8, d_model=12,
                                                        n_heads=3, n_layers=3, d_ff=20),
                                    CONFIG.replace(**GPT2), CONFIG.replace(norm="pre")])
def test_parameter_count_is_the_canonical_tensors(config):
    tensors = FakeBackend(config, TrainConfig()).tensors
    assert memory.parameter_count(config) == sum(t.size for t in tensors.values())


def test_memory_estimate_counts_the_attention_scores_per_layer():
    small = GPTConfig.preset("small")
    e = memory.estimate(small, 16, training=True)
    assert e.parts["weights"] == 4 * memory.parameter_count(small)
    assert e.parts["attention scores"] == 4 * 2 * 16 * 4 * 64 * 64 * 4  # L, kept twice, B H T T f32
    assert 250e6 < e.total < 400e6  # XLA's footprint of this step: bench_small_cpu.json's peak memory
    long = memory.estimate(small.replace(seq_len=128), 16, training=True)
    assert long.parts["attention scores"] == 4 * e.parts["attention scores"]
    assert memory.estimate(small, 16, training=False).parts["attention scores"] == \
        e.parts["attention scores"] // 4  # one layer at a time
    assert "attention scores" not in memory.estimate(small, 16, training=True, scores=False).parts
    pair = e + e  # two models held at once, stepping one at a time
    assert pair.parts["weights"] == 2 * e.parts["weights"] and pair.parts["logits"] == e.parts["logits"]


def test_memory_check_refuses_what_cannot_fit():
    need = memory.estimate(CONFIG.replace(seq_len=100_000), 16, training=True)
    with pytest.raises(ConfigError, match=r"training needs at least .* TB .*attention scores "
                                          r"alone .* more than the 1.0 GB of here"):
        memory.check(need, "training", 10**9, "here")
    memory.check(memory.estimate(CONFIG, 16, training=True), "training", 10**9, "here")
    memory.check(need, "training", None, "nowhere known")  # no limit known: no check


def test_memory_estimate_counts_8_bytes_a_value_in_float64():
    small = GPTConfig.preset("small")
    single, double = (memory.estimate(small, 16, training=True, precision=p)
                      for p in ("highest", "float64"))
    assert double.parts["weights"] == 2 * single.parts["weights"] == 8 * memory.parameter_count(small)
    assert double.parts == {part: 2 * n for part, n in single.parts.items()}  # activations too
    # bf16 keeps float32 master weights (its bf16 activations counted as float32)
    assert memory.estimate(small, 16, training=True, precision="bf16").parts == single.parts


def test_memory_estimate_on_a_mesh_is_what_one_device_holds():
    small = GPTConfig.preset("small")
    whole = memory.estimate(small, 16, training=True)
    fsdp = memory.estimate(small, 16, training=True, mesh=MeshShape(fsdp=8))
    assert fsdp.parts["weights"] == 4 * per_device_elements(small, MeshShape(fsdp=8))
    # all but pred.bias (11548 values, which 8 does not divide) split 8 ways
    assert fsdp.parts["weights"] == pytest.approx(whole.parts["weights"] / 8, rel=1e-2)
    assert fsdp.parts["gradients and AdamW moments"] == 3 * fsdp.parts["weights"]
    for part in ("activations", "attention scores", "logits"):  # the rows split 8 ways
        assert fsdp.parts[part] == whole.parts[part] // 8
    data = memory.estimate(small, 16, training=True, mesh=MeshShape(data=8))
    assert data.parts["weights"] == whole.parts["weights"]  # replicated
    assert data.parts["activations"] == whole.parts["activations"] // 8
    tensor = memory.estimate(small, 16, training=True, mesh=MeshShape(tensor=4))
    assert tensor.parts["attention scores"] == whole.parts["attention scores"] // 4  # by heads
    assert tensor.parts["logits"] == whole.parts["logits"] // 4  # by vocabulary, 4 x 2887
    # residual stream, LayerNorms and projections whole (6 of B x T x d); the rest by 4
    b, t, d, f = 16, small.seq_len, small.d_model, small.d_ff
    assert tensor.parts["activations"] == small.n_layers * b * t * (6 * d + d + f // 2) * 4
    double = memory.estimate(small, 16, training=True, mesh=MeshShape(fsdp=8), precision="float64")
    assert double.parts == {part: 2 * n for part, n in fsdp.parts.items()}


def test_check_memory_holds_a_mesh_to_each_devices_memory_and_float64_to_8_bytes(monkeypatch):
    from flax_gpt import experiments

    small = GPTConfig.preset("small")
    whole = memory.estimate(small, 16, training=True).total
    sharded = memory.estimate(small, 16, training=True, mesh=MeshShape(fsdp=8)).total
    place = [experiments.GPU_MEMORY]

    def check(limit, **options):
        monkeypatch.setattr(experiments, "memory_limit", lambda *_: (limit, place[0]))
        experiments.check_memory(small, 16, "training", training=True, **options)

    # a GPU's memory holds each device's share, not the whole model
    with pytest.raises(ConfigError, match="training .* needs at least .* of the GPU's memory"):
        check(whole // 2)
    check(whole // 2, mesh="fsdp=8")
    # float64: twice the bytes, sharded or not
    check(whole * 3 // 2)
    with pytest.raises(ConfigError, match="needs at least"):
        check(whole * 3 // 2, precision="float64")
    check(sharded * 3 // 2, mesh="fsdp=8")
    with pytest.raises(ConfigError, match="needs at least"):
        check(sharded * 3 // 2, mesh="fsdp=8", precision="float64")
    # the mesh's fake CPU devices all hold their shares in the host's one memory
    place[0] = experiments.HOST_MEMORY
    with pytest.raises(ConfigError, match="needs at least .* of this machine's physical memory"):
        check(whole // 2, mesh="fsdp=8")


def test_train_refuses_a_config_that_cannot_fit_before_building(tmp_path):
    from flax_gpt import experiments

    with pytest.raises(ConfigError, match="attention scores alone"):
        experiments.train("torch", CONFIG.replace(seq_len=100_000), TrainConfig(steps=1),
                          synthetic=True, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---- what a user sees ----------------------------------------------------------------------------------

def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(dataset, tmp_path, capsys):
    loop.train(*make(dataset), tmp_path / "run", log_every=2, eval_every=3)
    err = capsys.readouterr().err
    assert "\r" not in err  # no bar frames
    lines = err.splitlines()
    assert lines[0].startswith("step 2/6, loss 0.5000, ") and "tokens/s" in lines[0]
    assert "ETA" in lines[0] and "step 6/6, loss 0.1667" in err
    assert "step 3: val loss 2.0000 (perplexity 7.4)" in lines


def test_the_bar_ends_on_the_last_loss_and_rate(dataset, tmp_path, capsys):
    """Before: the last refresh read the evaluation record (no loss) and a zero rate."""
    loop.train(*make(dataset), tmp_path / "run", log_every=2, eval_every=3, progress="bar")
    last = capsys.readouterr().err.split("\r")[-1]
    assert "6/6" in last and "loss=0.1667" in last, last
    assert "nan" not in last and "tok/s=0" not in last and "tok/s=" in last


def test_prepare_draws_no_bar_into_a_log(monkeypatch, tmp_path, capsys):
    from flax_gpt import prepare

    monkeypatch.setattr(prepare, "PROGRESS_MIN_BYTES", 0)  # a bar even for a small text
    prepare_dataset([("text.txt", text(50, 0).encode())], tmp_path / "ds")
    assert "tokenizing" not in capsys.readouterr().err  # stderr is not a terminal here


def test_generated_text_renders_line_ends_and_hides_specials(dataset):
    ds = TokenDataset.load(dataset)
    ids = [*ds.encode("the king"), 2, 1, *ds.encode("good night"), 0, 2, 1]
    assert ds.render(ids) == "the king\ngood night <unk>"
    assert ds.render(ids, specials=True) == "the king <eos> <bos> good night <unk> <eos> <bos>"


def test_train_without_data_offline_says_what_works(monkeypatch, tmp_path):
    from flax_gpt import experiments, prepare

    monkeypatch.setenv("FLAX_GPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(prepare.CORPORA, "tinyshakespeare",
                        {**prepare.CORPORA["tinyshakespeare"],
                         "url": "http://127.0.0.1:9/tinyshakespeare.txt"})  # refused: offline
    with pytest.raises(DatasetError) as e:
        experiments.train("flax", CONFIG, TrainConfig(steps=1), out=tmp_path / "run")
    message = str(e.value)
    assert "--text-file PATH" in message and "flax-gpt prepare" in message
    assert "--data DIR" in message and str(tmp_path / "cache" / "tinyshakespeare.txt") in message
    assert "pass a local copy with --text-file" not in message  # train has no --text-file
    assert not (tmp_path / "run").exists()
