"""The one exception family the CLI knows how to print.

Every error a user can cause is raised as a LoratoolError carrying *what* went wrong (with *where*: a
recipe key path, a file and line) and a *hint* saying what to do next. The CLI prints both and exits 1 (3 for an InternalError);
nothing else in the package prints errors.
"""

from __future__ import annotations


class LoratoolError(Exception):
    """A problem the user can fix: bad recipe, bad data, missing file, refused overwrite..."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"


class InternalError(LoratoolError):
    """Something failed that the user did not cause (a bug, or a library failing): exit code 3, and the
    message says where the traceback was kept."""

    exit_code = 3
