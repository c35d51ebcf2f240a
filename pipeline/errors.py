"""The errors a user can act on, one family: each message says in one line what is wrong
and what to do about it.

`process.run` turns one into that line on stderr, after the program's name, and exit status
1; inside a stage, `stage.context` first records it on the stage's MLflow run, which ends
FAILED. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Its message is all the user sees: it names the file, param or server, and the fix."""


class MissingInputError(PipelineError):
    """An input an earlier stage writes is missing, empty or unreadable: run that stage."""


class BadInputError(PipelineError):
    """A file or argument the user gave will not do."""


class TrackingError(PipelineError):
    """The MLflow tracking store refused a request or could not be reached."""
