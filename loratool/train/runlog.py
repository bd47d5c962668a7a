"""train.log: everything a run prints — loratool's lines, library warnings, progress — also lands in the
run directory, so a run that failed overnight can be read the next morning.

The run directory exists only once data and model have loaded (a typo must not leave a half-made run
behind), so what is printed before that is kept in memory and written when the directory is attached.
Library loggers (transformers, peft, trl, ...) hold the stream they were created with, so their records
are copied to the file by a logging handler as well.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from pathlib import Path
from typing import Any, TextIO

LIBRARY_LOGGERS = ("transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "torch")


class _Tee(io.TextIOBase):
    """A text stream that writes to the terminal stream and to the run log."""

    def __init__(self, stream: TextIO, sink: RunLog):
        self.stream, self.sink = stream, sink

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.sink.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


class _ToRunLog(logging.Handler):
    def __init__(self, sink: RunLog):
        super().__init__(logging.WARNING)
        self.sink = sink
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sink.write(self.format(record) + "\n", from_logger=True)
        except Exception:  # a log line must never break training
            self.handleError(record)


class RunLog:
    """Context manager: tees stdout/stderr (and library loggers) into a buffer, then into `attach(path)`."""

    def __init__(self) -> None:
        self._buffer: list[str] = []
        self._file: TextIO | None = None
        self._saved: tuple[Any, Any] | None = None
        self._handler = _ToRunLog(self)
        self._in_stream_write = False

    def __enter__(self) -> RunLog:
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self)  # type: ignore[assignment]
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).addHandler(self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).removeHandler(self._handler)
        if self._saved is not None:
            sys.stdout, sys.stderr = self._saved
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, text: str, *, from_logger: bool = False) -> None:
        if self._file is not None:
            self._file.write(text)
            self._file.flush()
        else:
            self._buffer.append(text)

    def attach(self, path: Path, *, resumed: bool = False) -> None:
        """Start writing into `path` (appending after a resume), beginning with what was buffered."""
        self._file = path.open("a" if resumed else "w", encoding="utf-8")
        if resumed:
            self._file.write(f"\n--- resumed {time.strftime('%Y-%m-%d %H:%M:%S %Z')} ---\n")
        self._file.write("".join(self._buffer))
        self._file.flush()
        self._buffer.clear()
