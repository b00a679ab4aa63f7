"""Time what each fault of a two-process run costs, in both engines (`--nproc 2` PyTorch DDP;
a JAX job of two processes with 2 fake CPU devices each): how many seconds after SIGINT or
SIGTERM to one process, or kill -9 of one, every process of the job has exited, and how
many after its last step a finished run has. The runs are those of tests/test_faults.py
(tiny, synthetic, a checkpoint every 10 steps; tests/faulty.py slows each step by 0.1 s so
that a signal lands mid-run). Writes a result file that docs/devices.md's faults table is
rendered from (scripts/render_docs.py).

    python scripts/fault_times.py --out benchmarks/results/faults_cpu.json [--repeats 3]
"""

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from flax_gpt.core import runfolder  # noqa: E402
from flax_gpt.core.files import atomic_file  # noqa: E402
from flax_gpt.sidebyside.pair import environment  # noqa: E402
from tests.faultjobs import KILL_AFTER, SIGNAL_AFTER, Job, wait_for  # noqa: E402

# (engine, fault, to whom); "finish": no fault, the time from the last step to the exit
FAULTS = [("torch", "SIGINT", 1), ("torch", "SIGTERM", "launcher"), ("torch", "SIGKILL", 1),
          ("torch", "finish", None), ("jax", "SIGINT", 1), ("jax", "SIGTERM", 0),
          ("jax", "SIGKILL", 1), ("jax", "SIGKILL", 0), ("jax", "finish", None)]


def measure(engine, fault, target, folder):
    """Seconds from the fault (or the last step's metrics line) to every process of the job
    gone, and the exit codes."""
    job = Job(engine, folder / "run")
    if fault == "finish":
        done = job.finish()
        seconds = time.time() - (job.out / runfolder.METRICS).stat().st_mtime
    else:
        after = KILL_AFTER if fault == "SIGKILL" else SIGNAL_AFTER
        wait_for(lambda: len(job.logged_steps()) >= after, f"step {after}", job)
        pid = job.pid(target)
        start = time.monotonic()
        os.kill(pid, getattr(signal, fault))
        done = job.finish()
        seconds = time.monotonic() - start
    return seconds, [code for code, _, _ in done]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the result file (JSON) to write")
    p.add_argument("--repeats", type=int, default=3, help="runs of each fault (default 3)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        print("fault_times: error: --repeats must be at least 1", file=sys.stderr)
        return 2
    rows = []
    for engine, fault, target in FAULTS:
        seconds, codes = [], set()
        for i in range(args.repeats):
            with tempfile.TemporaryDirectory() as folder:
                s, c = measure(engine, fault, target, Path(folder))
            seconds.append(s)
            codes.add(tuple(c))
            print(f"{engine} {fault} to {target}: {s:.2f} s, exit codes {c}", file=sys.stderr)
        rows.append({"engine": engine, "fault": fault, "target": target, "seconds": seconds,
                     "median_s": statistics.median(seconds), "max_s": max(seconds),
                     "exit_codes": sorted(codes)})
    result = {**environment({}), "repeats": args.repeats, "faults": rows}
    with atomic_file(Path(args.out), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
