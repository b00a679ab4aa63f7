"""The run folder a training run writes, and its checkpoints.

    config.json           model config, train config, framework, dataset reference (its
                          resolved path and manifest sha256, or the synthetic vocabulary)
    metrics.jsonl         one JSON object a line: train steps (loss, lr, grad_norm, tokens/s,
                          elapsed) and evaluations (val_loss, val_ppl)
    checkpoints/step_N/   weights.safetensors (canonical: flax_gpt.load / torch_reference.load),
                          optimizer state, state.json (step, checksums); the last K are kept.
                          A run whose state spans processes (several JAX processes, PyTorch
                          FSDP) keeps parameters and optimizer state in state/ instead, each
                          process writing its own shards (orbax, torch.distributed.checkpoint)
    weights.safetensors   the latest weights, for `flax_gpt.load(RUN / "weights.safetensors")`
    .lock                 locked (fcntl) by the one process writing the folder

A checkpoint folder is written under a temporary name and renamed, so a crash leaves the
previous one intact; its files are verified against their checksums before anything loads.
The next start removes what a killed process left: temporary names, and metrics past the
checkpoint it resumes from. A fresh run that fails before its first checkpoint removes its
folder, so that the same command can simply be run again.
"""

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path

from flax_gpt.core import weights
from flax_gpt.core.config import ConfigError, GPTConfig
from flax_gpt.core.data import TokenDataset
from flax_gpt.core.errors import CheckpointError, DatasetError
from flax_gpt.core.files import atomic_dir, atomic_file, sha256_file, shared_tmp, write_json
from flax_gpt.core.streams import manifest_sha256

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
WEIGHTS = "weights.safetensors"
SHARDED = "state"  # a checkpoint's parameters and optimizer state, written shard by shard
LOCK = ".lock"
TENSORBOARD = "tensorboard"
RUN_FILES = {CONFIG, METRICS, CHECKPOINTS, WEIGHTS, LOCK, TENSORBOARD}  # all a run writes


def run_record(framework, config, tc, stream):
    """What config.json holds: the experiment a resume must repeat."""
    data = dict(stream.reference)
    if "path" in data:
        # Resolved, so that `eval --run` from another folder finds it; the data itself is
        # identified by its manifest sha256, so the same folder spelled another way is the same.
        data["path"] = str(Path(data["path"]).resolve())
        data["vocab_sha256"] = stream.dataset.vocab_sha256
    return {"framework": framework, "model": config.to_dict(), "train": tc.to_dict(), "data": data}


def read_record(run):
    """The saved config.json of a run folder, checked to hold what `flax-gpt train` writes."""
    run = Path(run)
    path = run / CONFIG
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointError(f"{run} is not a run folder (it has no {CONFIG})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}): {run} is not a usable run folder") from None
    problem = _record_problem(record)
    if problem:
        raise CheckpointError(f"{path} {problem}: it was not written by 'flax-gpt train' or was "
                              f"edited; {run} is not a usable run folder")
    return record


def _record_problem(record):
    if not isinstance(record, dict):
        return "is not a JSON object"
    for key, kind in (("framework", str), ("model", dict), ("train", dict), ("data", dict)):
        if not isinstance(record.get(key), kind):
            return f"has no {key!r} entry"
    try:
        GPTConfig.from_dict(record["model"])
    except ConfigError as e:
        return f"holds a bad model config ({e})"
    data = record["data"]
    if not data.get("synthetic") and not all(isinstance(data.get(k), str)
                                             for k in ("path", "manifest_sha256")):
        return "names no dataset (path and manifest_sha256)"
    return None


def check_start(run, record, *, resume, stop_at=None, locked=False):
    """Refuse, writing nothing, a run that `open_run` would refuse: called before a backend is
    built, so that a refusal comes before any compile. Returns the checkpoint to resume from.
    `locked`: the caller holds the run's lock (otherwise a run another process is writing is
    refused as such first, since what its folder holds is still changing)."""
    run = Path(run)
    if run.exists() and not run.is_dir():
        raise CheckpointError(f"--out {run} is a file, not a run folder: choose another --out")
    if not locked and (run / LOCK).exists():
        with _locked(run):  # refused here while another process holds it
            pass
    if resume:
        _check_same_experiment(run, read_record(run), record)
        folder = latest_checkpoint(run)
        check_unfinished(run, checkpoint_step(folder), record["train"]["steps"], stop_at)
        return folder
    if run.is_dir():
        if checkpoints(run):
            raise CheckpointError(f"run folder {run} already exists: pass --resume to continue "
                                  f"it or choose another --out")
        others = sorted(p.name for p in run.iterdir()
                        if p.name not in RUN_FILES and not _temporary(p))
        if others:
            raise CheckpointError(f"--out {run} already exists and holds other files "
                                  f"({', '.join(others[:3])}): choose another --out")
    return None


def check_unfinished(run, step, steps, stop_at=None):
    """Refuse to resume a run that is already at the step it would train to."""
    end = min(steps, stop_at) if stop_at else steps
    if step >= end:
        raise CheckpointError(
            f"{run} is already at step {step} of --steps {steps}: it is finished" if end == steps
            else f"{run} is already at step {step}: pass a larger --stop-at (at most --steps "
                 f"{steps}) or none to go on")


@contextlib.contextmanager
def open_run(run, backend, stream, *, resume, stop_at=None):
    """Lock `run` and make it ready to write; yield the checkpoint folder to resume from, or
    None for a fresh run.

    Fresh: the folder is created, or taken over if it holds only a run that never reached a
    checkpoint; a fresh run that then fails before its first checkpoint is removed again.
    Resume: the saved record must describe the same experiment. Either way what a killed
    process left behind is cleaned first.
    """
    run = Path(run)
    record = run_record(backend.name, backend.config, backend.tc, stream)
    check_start(run, record, resume=resume, stop_at=stop_at)  # before the folder is created
    if resume:
        with _locked(run):
            _clean_temporary(run)
            folder = check_start(run, record, resume=True, stop_at=stop_at, locked=True)
            truncate_metrics(run, checkpoint_step(folder))
            yield folder
        return
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    with _locked(run):
        _clean_temporary(run)
        check_start(run, record, resume=False, locked=True)
        _remove_run_files(run)  # a run killed before its first checkpoint: start it over
        write_json(run / CONFIG, record)
        try:
            yield None
        except BaseException:
            if not checkpoints(run):  # nothing worth resuming: leave nothing that blocks a retry
                _remove_run_files(run)
                if created:
                    shutil.rmtree(run, ignore_errors=True)
            raise


@contextlib.contextmanager
def _locked(run):
    """Hold RUN/.lock for the duration: a second process writing the same run is refused
    (the kernel drops the lock when the holder exits, even on kill -9)."""
    f = open(run / LOCK, "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        raise CheckpointError(f"run folder {run} is in use by another process"
                              f"{f' (pid {pid})' if pid else ''}: wait for it to finish or "
                              f"choose another --out") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()


def _temporary(path):
    """A name core.files.atomic_file / atomic_dir writes under before renaming."""
    return path.name.startswith(".") and path.name.endswith(".tmp")


def _clean_temporary(run):
    """Remove the temporary names of writes a killed process left unfinished."""
    for folder in (run, run / CHECKPOINTS):
        for tmp in folder.glob(".*.tmp"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def _remove_run_files(run):
    for name in RUN_FILES - {LOCK}:  # the lock is held: keep it until the folder goes
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _check_same_experiment(run, saved, record):
    if saved["framework"] != record["framework"]:
        raise CheckpointError(f"cannot resume {run}: its framework was {saved['framework']}, this "
                              f"run asks for {record['framework']}")
    if saved["model"] != record["model"]:
        raise CheckpointError(f"cannot resume {run}: its model config was "
                              f"{json.dumps(saved['model'], sort_keys=True)}, this run asks for "
                              f"{json.dumps(record['model'], sort_keys=True)}")
    old, new = saved["data"], record["data"]
    if old.get("synthetic") or new.get("synthetic"):
        same_data = old == new
    else:
        same_data = old["manifest_sha256"] == new["manifest_sha256"]
    if not same_data:
        raise CheckpointError(f"cannot resume {run}: it trained on the dataset "
                              f"{json.dumps(old, sort_keys=True)}, this run asks for "
                              f"{json.dumps(new, sort_keys=True)}")
    differ = sorted(k for k in set(saved["train"]) | set(record["train"])
                    if saved["train"].get(k) != record["train"].get(k))
    if differ == ["steps"]:
        raise CheckpointError(
            f"cannot resume {run}: it was started with --steps {saved['train']['steps']}, not "
            f"{record['train']['steps']}; the learning-rate schedule is laid out over --steps, so "
            f"a changed --steps is not a continuation. Resume with --steps "
            f"{saved['train']['steps']}; to split a run, start it with the full --steps and "
            f"--stop-at N, then --resume")
    if differ:
        changes = ", ".join(f"{k} {saved['train'].get(k)} -> {record['train'].get(k)}"
                            for k in differ)
        raise CheckpointError(f"cannot resume {run}: training settings differ from the saved "
                              f"ones ({changes}); a resumed run must use the same settings "
                              f"(only --stop-at may change)")


def truncate_metrics(run, step):
    """Drop the metrics records past `step` (written after the checkpoint a resume starts
    from, and about to be written again) and a line a killed process left half-written."""
    path = Path(run) / METRICS
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    with atomic_file(path, "w") as f:
        f.writelines(kept)


def checkpoints(run):
    return sorted((Path(run) / CHECKPOINTS).glob("step_*"))


def latest_checkpoint(run):
    folders = checkpoints(run)
    if not folders:
        raise CheckpointError(f"{run} has no checkpoint to resume from (it stopped before its "
                              f"first one): run the same command without --resume to start again")
    return folders[-1]


def checkpoint_step(folder):
    return int(Path(folder).name.removeprefix("step_"))


def how_to_continue(run):
    """What a run that stopped without finishing leaves, and how to go on from it."""
    saved = checkpoints(run)
    if saved:
        return (f"the run folder keeps its last checkpoint, step {checkpoint_step(saved[-1])}: "
                f"continue with --resume")
    return "no checkpoint was written: run the same command again"


def spans_processes(backend):
    """Whether `backend` is one process of a run on several: its state spread over them
    (`collective`), or held whole by each of its `world` ranks (data parallel)."""
    return getattr(backend, "collective", False) or getattr(backend, "world", 1) > 1


def save_checkpoint(run, backend, step, keep, *, primary=True):
    """Write checkpoint `step` of `backend` into `run`, keeping the last `keep`.

    A backend whose state one process holds whole is saved by the primary alone. One whose
    state is spread over processes (`backend.collective`) is saved by every process at once:
    each writes its own shards into one temporary folder (`backend.save`), and the primary
    then checksums it and renames it into place, between barriers that every process meets.
    Weights holding NaN or Inf are refused (NonFiniteError) before anything is written: on
    several processes by all of them alike (`backend.check_finite`, a collective).
    """
    run = Path(run)
    folder = run / CHECKPOINTS / f"step_{step:08d}"
    if spans_processes(backend):
        # weights.save checks only the gathered weights, on the primary, after every process
        # wrote its shards; and a rank that stopped alone would leave the others waiting
        backend.check_finite()
    collective = getattr(backend, "collective", False)
    if not collective:
        if primary:
            _write_checkpoint(folder, backend, step, backend.save)
            _publish(run, folder, keep)
        return folder

    def save(tmp):
        backend.barrier(f"{folder.name} folder")  # the primary has made the temporary folder
        backend.save(tmp)
        backend.barrier(f"{folder.name} written")  # by every process, before it is renamed

    if not primary:
        save(shared_tmp(folder))
        return folder
    _write_checkpoint(folder, backend, step, save, shared=True)
    _publish(run, folder, keep)
    return folder


def _write_checkpoint(folder, backend, step, save, shared=False):
    with atomic_dir(folder, force=True, shared=shared) as tmp:
        save(tmp)
        files = {str(p.relative_to(tmp)): sha256_file(p)
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / STATE, {"step": step, "framework": backend.name, "files": files})


def _publish(run, folder, keep):
    """The checkpoint's weights as the run's latest; checkpoints past the last `keep` removed."""
    with atomic_file(run / WEIGHTS) as f:
        f.write((folder / WEIGHTS).read_bytes())
    for old in checkpoints(run)[:-keep]:
        shutil.rmtree(old)


def load_checkpoint(folder, backend):
    """Verify every file of a checkpoint against its checksum, then restore; returns the step."""
    try:
        state = json.loads((folder / STATE).read_text())
        if not isinstance(state["step"], int) or not isinstance(state["files"], dict):
            raise TypeError("bad step or files entry")
        for name, digest in state["files"].items():
            if sha256_file(folder / name) != digest:
                raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its "
                                      f"checksum; delete the folder to resume from the one before")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError,
            UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt ({e}); delete it to "
                              f"resume from the one before") from None
    backend.load(folder)
    return state["step"]


def checkpoint_weights(folder, config):
    """The canonical tensors of a checkpoint folder, refused unless they are of `config`."""
    saved, tensors = weights.load(Path(folder) / WEIGHTS)
    if saved != config:
        raise CheckpointError(f"{folder} holds a model of config {saved.to_json()}, "
                              f"not {config.to_json()}")
    return tensors


def run_dataset(record, data=None):
    """The dataset to read a run's ids with: the folder `data`, which must hold the run's
    vocabulary, or else the one the run trained on, which must be unchanged (a dataset
    prepared again in place would decode the ids with another vocabulary)."""
    saved = record["data"]
    vocab_size = record["model"]["vocab_size"]
    if data is None:
        if saved.get("synthetic"):
            raise DatasetError(f"this run trained on synthetic tokens, which have no text: pass "
                               f"--data with a dataset of {vocab_size} tokens")
        path = Path(saved["path"])
        if not path.is_dir():
            raise DatasetError(f"the dataset this run trained on, {path}, does not exist any "
                               f"more: pass --data with a copy of it")
        dataset = TokenDataset.load(path)
        if manifest_sha256(dataset) != saved["manifest_sha256"]:
            raise DatasetError(f"dataset {path} has changed since this run trained on it (its "
                               f"manifest sha256 differs: prepared again?), so its vocabulary may "
                               f"not be the run's: pass --data with the dataset the run used")
        return dataset
    dataset = TokenDataset.load(data)
    vocab = saved.get("vocab_sha256")
    if vocab and dataset.vocab_sha256 != vocab:
        raise DatasetError(f"--data {data} has another vocabulary than the one this run trained "
                           f"on, so its ids would mean other words: pass a dataset prepared with "
                           f"the run's vocabulary")
    if dataset.vocab_size != vocab_size:
        raise DatasetError(f"--data {data} has a vocabulary of {dataset.vocab_size} tokens, the "
                           f"run's model {vocab_size}")
    return dataset
