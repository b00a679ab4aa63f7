"""Two-process jobs of either engine, started through tests/faulty.py, for the fault-injection
tests (tests/test_faults.py) and the script that times each fault (scripts/fault_times.py).
Every wait has a timeout: a hang is a JobError, never a stalled suite."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from flax_gpt.core import runfolder

REPO = Path(__file__).resolve().parents[1]


class JobError(AssertionError):
    """A job did not do what was waited for in time, or ended first."""


STEPS = 40
STEP_SLEEP = "0.1"  # s per step: a signal sent after step SIGNAL_AFTER lands seconds before the end
SIGNAL_AFTER = 5
CHECKPOINT_EVERY = 10
KILL_AFTER = 15  # a process dies between steps after this one: checkpoint 10 is the one kept
KILLED_IN_SAVE = 20  # the checkpoint during whose write a process kills itself
TIMEOUT = 240  # s: the longest any run or wait may take
NOTICE = 30  # s: how soon after a fault every process must have exited (JAX's heartbeat: 10)
ARGS = ["train", "--preset", "tiny", "--synthetic", "--batch-size", "8", "--steps", str(STEPS),
        "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0",
        "--checkpoint-every", str(CHECKPOINT_EVERY)]
ENGINE_ARGS = {"torch": ["--framework", "torch", "--nproc", "2"], "jax": ["--mesh", "data=4"]}
TWO_DEVICES = "--xla_force_host_platform_device_count=2"


class Job:
    """A run of `engine` on two processes, started through tests/faulty.py: for "torch" the
    launcher (whose ranks write their pids into PID_DIR), for "jax" the two processes."""

    def __init__(self, engine, out, *extra, env=None):
        self.engine, self.out = engine, out
        self.pid_dir = out.parent / f"{out.name}.pids"
        self.pid_dir.mkdir(exist_ok=True)
        command = [sys.executable, "tests/faulty.py", *ARGS, *ENGINE_ARGS[engine], "--out",
                   str(out), *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "STEP_SLEEP": STEP_SLEEP,
               "PID_DIR": str(self.pid_dir), **(env or {})}
        if engine == "jax":
            with socket.socket() as s:  # a free port for the coordinator
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env["XLA_FLAGS"] = TWO_DEVICES
            commands = [command + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                   "--process-id", str(i)] for i in range(2)]
        else:
            commands = [command]
        self.processes = [subprocess.Popen(c, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE) for c in commands]

    def pid(self, target):
        """The pid of "launcher", or of rank / process `target` (an int)."""
        if target == "launcher" or self.engine == "jax":
            return self.processes[0 if target == "launcher" else target].pid
        path = self.pid_dir / f"rank{target}"
        wait_for(path.exists, f"rank {target} to start", self)
        return int(path.read_text())

    def wait_gone(self, target, timeout=TIMEOUT):
        """Return once rank / process `target` has exited (or was killed)."""
        if self.engine == "jax":
            try:
                self.processes[target].wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise JobError(f"process {target} did not exit within {timeout} s") from None
            return
        pid = self.pid(target)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            if time.monotonic() > deadline:
                self.kill()
                raise JobError(f"rank {target} did not exit within {timeout} s")
            time.sleep(0.02)

    def logged_steps(self):
        metrics = self.out / runfolder.METRICS
        text = metrics.read_text() if metrics.exists() else ""
        return [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]

    def finish(self, timeout=TIMEOUT):
        """[(returncode, stdout, stderr)] of every process, all exited within `timeout` s."""
        deadline = time.monotonic() + timeout
        try:
            outputs = [p.communicate(timeout=max(deadline - time.monotonic(), 0.1))
                       for p in self.processes]
        except subprocess.TimeoutExpired:
            self.kill()
            raise JobError(f"a process of the {self.engine} job did not exit within {timeout} s")
        self.exited, self.exited_wall = time.monotonic(), time.time()  # the last one exited
        return [(p.returncode, *output) for p, output in zip(self.processes, outputs)]

    def kill(self):
        for p in self.processes:
            p.kill()
            p.communicate()


def _state(pid):
    """The state of process `pid` from /proc ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return ""


def wait_for(condition, what, job, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in job.processes):
            codes = [(p.poll(), p.communicate()[1][-2000:]) for p in job.processes]
            raise JobError(f"the job ended while waiting for {what}: {codes}")
        if time.monotonic() > deadline:
            job.kill()
            raise JobError(f"waited {timeout} s for {what}")
        time.sleep(0.05)


# a line of JAX's C++ log: "W1202 19:45:07.23 ..." (absl) or "2026-12-02 19:38:36.81: W ..." (tsl)
JAX_LOG = re.compile(r"([IWEF]\d{4} |\d{4}-\d\d-\d\d [\d:.]+: [IWEF] )")
JAX_ERROR = re.compile(r"([EF]\d{4} |\d{4}-\d\d-\d\d [\d:.]+: [EF] )")


def explain(done):
    """What a failed assertion on `done` (Job.finish()) shows: each process's exit code, the
    errors and fatal lines of JAX's log in full (the cause of an abort is logged long before
    its stack trace ends stderr), and the end of its stderr."""
    return [(code, [line for line in err.splitlines() if JAX_ERROR.match(line)], err[-1500:])
            for code, _, err in done]


def ours(err):
    """stderr's lines that report an error or an interrupt: not gloo's connection lines,
    JAX's log, progress lines or the mesh's table."""
    return [line for line in err.splitlines()
            if ("error" in line or "interrupted" in line) and "peer ranks" not in line
            and not JAX_LOG.match(line)]
