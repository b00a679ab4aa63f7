"""The run folder a training run writes, and its checkpoints.

    config.json           model config, train config, framework, dataset reference
    metrics.jsonl         one JSON object a line: train steps (loss, lr, grad_norm, tokens/s,
                          elapsed) and evaluations (val_loss, val_ppl)
    checkpoints/step_N/   weights.safetensors (canonical: flax_gpt.load / torch_reference.load),
                          optimizer state, state.json (step, checksums); the last K are kept
    weights.safetensors   the latest weights, for `flax_gpt.load(RUN / "weights.safetensors")`

A checkpoint folder is written under a temporary name and renamed, so a crash leaves the
previous one intact; its files are verified against their checksums before anything loads.
"""

import json
import shutil
from pathlib import Path

from flax_gpt.core import weights
from flax_gpt.core.errors import CheckpointError
from flax_gpt.core.files import atomic_dir, atomic_file, sha256_file, write_json

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE = "state.json"
WEIGHTS = "weights.safetensors"


def run_record(backend, stream):
    return {"framework": backend.name, "model": backend.config.to_dict(),
            "train": backend.tc.to_dict(), "data": stream.reference}


def read_record(run):
    """The saved config.json of a run folder."""
    run = Path(run)
    try:
        return json.loads((run / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{run} is not a run folder (no readable {CONFIG})") from None


def open_run(run, backend, stream, *, resume):
    """Create `run`, or check that resuming it continues the same experiment. Returns the
    checkpoint folder to resume from, or None."""
    run = Path(run)
    record = run_record(backend, stream)
    if not resume:
        if run.exists() and any(run.iterdir()):
            raise CheckpointError(f"run folder {run} already exists: pass --resume to continue it "
                                  f"or choose another --out")
        run.mkdir(parents=True, exist_ok=True)
        write_json(run / CONFIG, record)
        return None
    try:
        saved = json.loads((run / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{run} has no readable {CONFIG}: it is not a run folder") from None
    for key, what in (("framework", "framework"), ("model", "model config"),
                      ("data", "dataset")):
        if saved[key] != record[key]:
            raise CheckpointError(f"cannot resume {run}: its {what} was {json.dumps(saved[key])}, "
                                  f"this run asks for {json.dumps(record[key])}")
    unchanged = {k: v for k, v in saved["train"].items() if k != "steps"}
    if unchanged != {k: v for k, v in record["train"].items() if k != "steps"}:
        raise CheckpointError(f"cannot resume {run}: training settings differ from the saved "
                              f"{json.dumps(saved['train'])} (only --steps may change)")
    return latest_checkpoint(run)


def latest_checkpoint(run):
    folders = sorted((Path(run) / CHECKPOINTS).glob("step_*"))
    if not folders:
        raise CheckpointError(f"{run} has no checkpoint to resume from")
    return folders[-1]


def save_checkpoint(run, backend, step, keep):
    run = Path(run)
    folder = run / CHECKPOINTS / f"step_{step:08d}"
    with atomic_dir(folder, force=True) as tmp:
        backend.save(tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        write_json(tmp / STATE, {"step": step, "framework": backend.name, "files": files})
    with atomic_file(run / WEIGHTS) as f:
        f.write((folder / WEIGHTS).read_bytes())
    for old in sorted((run / CHECKPOINTS).glob("step_*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def load_checkpoint(folder, backend):
    """Verify every file of a checkpoint against its checksum, then restore; returns the step."""
    try:
        state = json.loads((folder / STATE).read_text())
        for name, digest in state["files"].items():
            if sha256_file(folder / name) != digest:
                raise CheckpointError(f"checkpoint {folder} is corrupt: {name} does not match its "
                                      f"checksum; delete the folder to resume from the one before")
    except (OSError, json.JSONDecodeError, KeyError) as e:
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
