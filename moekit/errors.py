"""Errors a user can act on.

Every failure caused by user input (a missing file, mismatched branches, an unsupported family)
is raised as a :class:`MoekitError` subclass with a message that says what is wrong and a hint
that says how to fix it. The CLI prints both and exits non-zero; library code never calls
``sys.exit`` and never lets a bare traceback reach a user for their own mistake.
"""

from __future__ import annotations


class MoekitError(Exception):
    """Base class for errors caused by input the user can fix.

    Attributes:
        message: what is wrong, in one or two sentences.
        hint: how to fix it (may be empty).
    """

    exit_code: int = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class InputNotFoundError(MoekitError):
    """A model directory, data file or run directory does not exist or lacks required files."""


class CorruptCheckpointError(MoekitError):
    """A safetensors file, config or training checkpoint cannot be read (damaged, or refused as unsafe)."""


class IncompatibleModelsError(MoekitError):
    """Inputs that must share an architecture (branches, seed) differ."""


class UnsupportedArchitectureError(MoekitError):
    """No adapter handles this model family, or the model uses a feature the target lacks."""


class OutputExistsError(MoekitError):
    """The output path exists and is not empty, and --force was not given."""


class InvalidOptionError(MoekitError):
    """An option value is out of range or inconsistent with other options."""


class ManifestError(MoekitError):
    """A run directory's moekit.yaml is missing, unreadable or from a newer moekit."""


class DataError(MoekitError):
    """Data files are missing, unreadable, empty or too short."""


class NonFiniteError(MoekitError):
    """A model holds NaN or infinite values (a diverged run), or a run diverged."""


class DiskFullError(MoekitError):
    """A write failed because the disk is full."""

    exit_code = 1


class BusyError(MoekitError):
    """Another job holds the output (a branch being trained, a model being tuned)."""


class ClusterError(MoekitError):
    """The job scheduler is missing, does not answer, or cannot give what a recipe asks for."""


class StoppedToRequeue(MoekitError):
    """A training job was asked to stop (its time limit is near, or it is preempted): it saved a checkpoint and
    stopped, so that its requeued job resumes from there."""

    exit_code = 75  # EX_TEMPFAIL: try again later
