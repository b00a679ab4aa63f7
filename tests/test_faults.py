"""Faults on several processes, injected as a scheduler or a user would: SIGINT and SIGTERM
to one process of a running job, kill -9 between steps and in the middle of a checkpoint
write, and many finished runs in a row (a rank that hung at exit, issue 21). Both engines:
`--nproc 2` (PyTorch DDP, two spawned ranks) and a JAX job of two processes of 2 fake CPU
devices each (`--mesh data=4`).

Every run is a subprocess through tests/faulty.py, and every wait has a timeout: a hang fails
the test, it does not stall the suite. Each fault's run is resumed and held to the unbroken
run of the same command bit for bit: every step's loss and the final weights.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from flax_gpt.core import runfolder, weights
from tests.conftest import REPO, assert_same

STEPS = 40
STEP_SLEEP = "0.1"  # s per step: a signal sent after step SIGNAL_AFTER lands seconds before the end
SIGNAL_AFTER = 5
CHECKPOINT_EVERY = 10
KILL_AFTER = 15  # kill -9 between steps after this one: checkpoint 10 is the one kept
KILLED_IN_SAVE = 20  # the checkpoint during whose write a process kills itself
TIMEOUT = 240  # s: the longest any run or wait of this module may take
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
            pytest.fail(f"a process of the {self.engine} job did not exit within {timeout} s")
        return [(p.returncode, *output) for p, output in zip(self.processes, outputs)]

    def kill(self):
        for p in self.processes:
            p.kill()
            p.communicate()


def wait_for(condition, what, job, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in job.processes):
            codes = [(p.poll(), p.communicate()[1][-2000:]) for p in job.processes]
            pytest.fail(f"the job ended while waiting for {what}: {codes}")
        if time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


# a line of JAX's C++ log: "W1202 19:45:07.23 ..." (absl) or "2026-12-02 19:38:36.81: W ..." (tsl)
JAX_LOG = re.compile(r"([IWEF]\d{4} |\d{4}-\d\d-\d\d [\d:.]+: [IWEF] )")


def ours(err):
    """stderr's lines that report an error or an interrupt: not gloo's connection lines,
    JAX's log, progress lines or the mesh's table."""
    return [line for line in err.splitlines()
            if ("error" in line or "interrupted" in line) and "peer ranks" not in line
            and not JAX_LOG.match(line)]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """unbroken(engine): the per-step losses and final weights of the engine's unbroken run
    (run once per engine and test process)."""
    runs = {}

    def get(engine):
        if engine not in runs:
            out = tmp_path_factory.mktemp(engine) / "unbroken"
            done = Job(engine, out).finish()
            assert [code for code, _, _ in done] == [0] * len(done), [e[-2000:] for *_, e in done]
            runs[engine] = losses(out), final_weights(out)
        return runs[engine]
    return get


def losses(run):
    return [json.loads(line)["loss"] for line in (run / runfolder.METRICS).read_text().splitlines()]


def final_weights(run):
    return weights.load(run / runfolder.WEIGHTS)[1]


def resume_matches(engine, out, reference):
    """`--resume` of the job in `out` finishes, and the run is the unbroken one bit for bit;
    no temporary folder is left behind."""
    done = Job(engine, out, "--resume").finish()
    assert [code for code, _, _ in done] == [0] * len(done), [err[-2000:] for _, _, err in done]
    unbroken_losses, unbroken_weights = reference
    assert losses(out) == unbroken_losses  # == on floats: bitwise
    resumed = final_weights(out)
    assert resumed.keys() == unbroken_weights.keys()
    for name, tensor in unbroken_weights.items():
        assert_same(resumed[name], tensor, err_msg=name)
    assert not list((out / runfolder.CHECKPOINTS).glob(".*.tmp"))


# (engine, signal, to whom): a JAX job has no launcher, each process is started on its own
SIGNALLED = [("torch", "SIGINT", 1), ("torch", "SIGTERM", 0), ("torch", "SIGTERM", "launcher"),
             ("jax", "SIGINT", 1), ("jax", "SIGTERM", 0)]


@pytest.mark.parametrize("engine, name, target", SIGNALLED,
                         ids=[f"{e}-{n}-to-{t}" for e, n, t in SIGNALLED])
def test_a_signal_to_one_process_stops_the_job_at_a_step_it_saves(unbroken, tmp_path, engine,
                                                                  name, target):
    """SIGINT or SIGTERM to one process (for PyTorch also to the launcher alone, as a
    scheduler may send it): every process stops after the same step and exits 128 + the
    signal's number, process 0 says in one line which step was saved, that step's checkpoint
    is there, and --resume gives the unbroken run."""
    out = tmp_path / "run"
    job = Job(engine, out)
    wait_for(lambda: len(job.logged_steps()) >= SIGNAL_AFTER, f"step {SIGNAL_AFTER}", job)
    signum = getattr(signal, name)
    os.kill(job.pid(target), signum)
    done = job.finish()
    assert [code for code, _, _ in done] == [128 + signum] * len(done), [e[-2000:] for *_, e in done]
    stopped = job.logged_steps()[-1]
    assert SIGNAL_AFTER <= stopped < STEPS
    # JAX's preemption notifier takes SIGTERM itself, and does not say which process got it
    who = ("" if engine == "jax" and name == "SIGTERM" else " (sent to the launcher)"
           if target == "launcher" else f" (sent to {'rank' if engine == 'torch' else 'process'} "
           f"{target})")
    line = (f"interrupted by {name}{who} after step {stopped}: saved a checkpoint of it in "
            f"{out}; continue with --resume")
    assert ours(done[0][2]) == [line], done[0][2][-3000:]
    assert all(ours(err) == [] for _, _, err in done[1:]), [err[-2000:] for *_, err in done]
    assert runfolder.checkpoint_step(runfolder.checkpoints(out)[-1]) == stopped
    resume_matches(engine, out, unbroken(engine))


# (engine, when, which process): PyTorch's DDP rank 0 alone writes checkpoints
KILLS = [("torch", "between-steps", 1), ("torch", "in-checkpoint-write", 0),
         ("jax", "between-steps", 1), ("jax", "between-steps", 0), ("jax", "in-checkpoint-write", 1)]


@pytest.mark.parametrize("engine, moment, victim", KILLS,
                         ids=[f"{e}-{m}-{v}" for e, m, v in KILLS])
def test_kill_9_of_one_process_is_reported_in_one_line_and_resumes(unbroken, tmp_path, engine,
                                                                   moment, victim):
    """kill -9 of one process, between steps or in the middle of writing a checkpoint: within
    NOTICE s every other process (PyTorch: the launcher) exits 2 with one line that names the
    process and the last checkpoint; --resume then gives the unbroken run, whatever the
    killed write left behind."""
    out = tmp_path / "run"
    env = {"KILL_IN_SAVE": f"{KILLED_IN_SAVE}:{victim}"} if moment == "in-checkpoint-write" else {}
    job = Job(engine, out, env=env)
    if moment == "between-steps":
        wait_for(lambda: len(job.logged_steps()) >= KILL_AFTER, f"step {KILL_AFTER}", job)
        os.kill(job.pid(victim), signal.SIGKILL)
        kept = KILL_AFTER // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        done = job.finish(timeout=NOTICE)  # the others notice, and exit within NOTICE s
    else:  # the victim kills itself in the write of checkpoint KILLED_IN_SAVE
        kept = KILLED_IN_SAVE - CHECKPOINT_EVERY
        done = job.finish()
    survivors = [d for i, d in enumerate(done) if engine == "torch" or i != victim]
    then = f"the run folder keeps its last checkpoint, step {kept}: continue with --resume"
    for code, _, err in survivors:
        assert code == 2, err[-3000:]
        if engine == "torch":
            expected = f"flax-gpt train: error: rank {victim} terminated with signal SIGKILL; {then}"
        else:
            expected = (f"flax-gpt train: error: process {victim} of the JAX job is gone (killed or "
                        f"crashed: its own output says why), so this one stops too; {then}")
        assert ours(err) == [expected], err[-3000:]
    resume_matches(engine, out, unbroken(engine))


def test_two_rank_runs_exit_promptly_again_and_again(tmp_path):
    """Ten finished `--nproc 2` runs in a row each exit 0 within NOTICE s of their last step
    (a rank hung at exit, joining gloo's threads, in 5 of 7 runs before)."""
    for i in range(10):
        out = tmp_path / f"run{i}"
        job = Job("torch", out, "--steps", "3", env={"STEP_SLEEP": "0"})
        wait_for(lambda: len(job.logged_steps()) == 3, "step 3", job)
        last_step = time.monotonic()
        ((code, _, err),) = job.finish(timeout=NOTICE)
        assert code == 0, err[-3000:]
        assert time.monotonic() - last_step < NOTICE
