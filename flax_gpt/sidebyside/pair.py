"""The two frameworks set up alike: one precision for both, both models from one set of
weights, the seeded initial weights, and the environment every side-by-side result records.
"""

import datetime
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import torch
from flax import nnx

from flax_gpt import model as flax_model
from flax_gpt import precision as flax_precision
from torch_reference import model as torch_model
from torch_reference import precision as torch_precision


def apply_precision(name):
    """Set both frameworks to precision `name` (before either builds anything); return the
    record of what was set."""
    # JAX's record last: its matmul_dtype says what the judged (Flax) side computed in
    return {**torch_precision.apply(name), **flax_precision.apply(name)}


def build_pair(config, tensors, precision_name="highest", attention="explicit", *,
               torch_device="cpu"):
    """(flax model, torch model on `torch_device`), both in eval mode, holding exactly
    `tensors` (upcast exactly for float64)."""
    param_dtype, dtype = flax_precision.dtypes(precision_name)
    fm = flax_model.GPT(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                        attention=attention)
    flax_model.set_canonical(fm, tensors)
    fm.eval()
    return fm, build_torch(config, tensors, precision_name, attention, torch_device=torch_device)


def build_torch(config, tensors, precision_name="highest", attention="explicit", *,
                torch_device="cpu"):
    """build_pair's PyTorch model alone (the float64 truth needs no switch of JAX's)."""
    tm = torch_model.GPT(config, attention=attention, dtype=torch_precision.dtype(precision_name))
    torch_model.set_canonical(tm, tensors)
    return tm.to(torch_device).eval()


def random_weights(config, seed=0):
    """Canonical tensors of a freshly initialised PyTorch model (the documented init)."""
    torch.manual_seed(seed)
    return torch_model.canonical(torch_model.GPT(config))


def nudged(tensors):
    """Every weight moved one ulp toward +inf: the smallest change float32 can make, and the
    size of the rounding differences two correct implementations leave after one step."""
    return {name: np.nextafter(t, np.float32(np.inf)) for name, t in tensors.items()}


def environment(precision_record, *, torch_device="cpu"):
    """Versions, the devices each framework actually ran on, the precision, and where the
    figures come from (command line, commit, date): what every side-by-side result records."""
    import flax
    import optax

    return {
        **precision_record, **provenance(),
        "jax_device": str(jax.devices()[0].device_kind),
        "jax_backend": jax.default_backend(),
        "torch_device": (torch.cuda.get_device_name(torch.device(torch_device))
                         if torch.device(torch_device).type == "cuda" else "cpu"),
        "versions": {"python": platform.python_version(), "jax": jax.__version__,
                     "jaxlib": importlib.metadata.version("jaxlib"),
                     "flax": flax.__version__, "optax": optax.__version__,
                     "torch": torch.__version__, "numpy": np.__version__},
        "machine": platform.machine(), "platform": platform.platform(),
    }


def provenance():
    """The command line, the commit of this checkout ("+dirty" with uncommitted changes; None
    outside git) and the UTC date: what lets a result file be reproduced."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return {"command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]), "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
