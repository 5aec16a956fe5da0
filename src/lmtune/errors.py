"""Errors that mean "the user gave us something wrong". The CLI prints them without a traceback."""


class LmtuneError(Exception):
    """Base class for user-facing errors: bad data, bad paths, bad models, refused overwrites."""


class DataError(LmtuneError):
    """A data file is missing, malformed, or has no usable rows. The message names file, line and field.

    For one bad line or record: `raw` is its text as read (a line that is not JSON, a CSV record) and `record` what
    it parsed to, so that `data clean` can keep it in its rejects file for a person to fix."""

    def __init__(self, message: str = "", raw: str | None = None, record: object = None):
        super().__init__(message)
        self.raw, self.record = raw, record


class ModelError(LmtuneError):
    """A model or adapter cannot be found or loaded."""


class OutputExistsError(LmtuneError):
    """An output folder exists and overwriting was not asked for."""


class LabelContractError(LmtuneError):
    """A training batch breaks the label contract (see data.check_batch)."""


class DiskFullError(LmtuneError):
    """The disk filled up while writing an output; the previous output (if any) is intact."""


class TrainingInterrupted(LmtuneError):
    """Training stopped on Ctrl-C or SIGTERM; the message says where the checkpoint is and how to resume."""
