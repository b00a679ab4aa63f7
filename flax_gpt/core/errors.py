"""Errors a user can fix. The CLI prints their message as one line and exits 2."""


class FlaxGPTError(Exception):
    """Base class: bad input, with a message that says what to do."""


class DatasetError(FlaxGPTError):
    """A dataset folder, text source or batching request is unusable."""


class WeightsError(FlaxGPTError):
    """A canonical weights file is missing, corrupt or does not match its config."""


class CheckpointError(FlaxGPTError):
    """A run folder or checkpoint cannot be resumed or read."""


class NonFiniteError(WeightsError):
    """A tensor holds NaN or Inf where finite weights are required."""


class DivergedError(FlaxGPTError):
    """Training produced a non-finite loss, gradient norm or weights; the run stopped."""


class DependencyError(FlaxGPTError):
    """An optional package a command needs is not installed (or does not load)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training at a step boundary, every process of the run at the
    same one, after a checkpoint of it was written. The exit code is 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal killed."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
