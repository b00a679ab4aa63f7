"""File helpers: atomic writes (a crash leaves either the old file or folder or the new one,
never half), JSON, checksums and PNG figures."""

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from flax_gpt.core.errors import FlaxGPTError


def _umask_mode(path, full):
    """Give a mkstemp/mkdtemp name the mode a plain open()/mkdir() would (they use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, full & ~umask)


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
    """Yield a file object on a temporary name beside `path`; rename it into place on success."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _umask_mode(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path, force=False, shared=False):
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.
    `shared`: the temporary name is `shared_tmp(path)`, not a random one, so that other
    processes of one job can write into it (what a killed run left there is removed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if shared:
        tmp = shared_tmp(path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        _umask_mode(tmp, 0o777)
    try:
        yield tmp
        if path.exists():
            if not force:
                raise FileExistsError(path)
            old = tmp.with_name(tmp.name + ".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def shared_tmp(path):
    """The temporary name of `atomic_dir(path, shared=True)`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


def check_writable(path, what="output"):
    """Refuse (FlaxGPTError, one line) an output file that cannot be written, before the work
    that produces it: a folder, or a place with no writable folder above it."""
    path = Path(path)
    if path.is_dir():
        raise FlaxGPTError(f"{what} {path} is a folder: name a file")
    above = path.parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise FlaxGPTError(f"cannot write {what} {path}: {above} is not a writable folder")


def write_json(path, payload):
    """`payload` as indented, key-sorted JSON, atomically; the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def sha256_file(path):
    return sha256_bytes(Path(path).read_bytes())


def save_figure(fig, path, dpi=110):
    """Write a matplotlib figure as PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=dpi)
    plt.close(fig)
