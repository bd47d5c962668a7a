"""The one exception family the CLI knows how to print.

Every error a user can cause is raised as a LoratoolError carrying *what* went wrong (with *where*: a
recipe key path, a file and line) and a *hint* saying what to do next. The CLI prints both and exits 1;
nothing else in the package prints errors.
"""

from __future__ import annotations


class LoratoolError(Exception):
    """A problem the user can fix: bad recipe, bad data, missing file, refused overwrite..."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\nhint: {self.hint}"
