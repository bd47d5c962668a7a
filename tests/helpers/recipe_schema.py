"""What the recipe-schema tests of several tiers share: a minimal recipe and a file writer."""

from __future__ import annotations

from pathlib import Path

MINIMAL = {
    "base_model": "some/model",
    "data": {"train": [{"path": "train.jsonl"}]},
    "training": {"output_dir": "out"},
}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
