"""Where loratool keeps what it derives from inputs (GGUF conversions, weight fingerprints, smoke bases)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where loratool keeps what it derives from inputs: $LORATOOL_CACHE, $XDG_CACHE_HOME/loratool or
    ~/.cache/loratool."""
    if os.environ.get("LORATOOL_CACHE"):
        return Path(os.environ["LORATOOL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "loratool"
    return Path.home() / ".cache" / "loratool"
