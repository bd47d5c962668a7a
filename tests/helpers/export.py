"""What the export tests of several tiers share: GGUF readers, model copies, logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch


def fields(path: Path) -> dict:
    """GGUF metadata as plain Python values (strings decoded, arrays as lists)."""
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader, dequantize

    return {
        t.name: dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        for t in GGUFReader(path).tensors
    }


def copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **config_changes}))
    return dst


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([ids])).logits[0]
