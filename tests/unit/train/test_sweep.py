"""`loratool sweep`: values split at top-level commas only.

The cells run in this process here (the sweep's `run_loratool` is replaced by the same command through the
CLI runner), so that a 2x2 grid on a tiny model stays fast; the real fresh-process path is the slow test at
the end."""

from __future__ import annotations

import pytest

from loratool.errors import LoratoolError
from loratool.train import sweep as sweep_module


def test_values_split_at_top_level_commas_only():
    axes = sweep_module.parse_vary(["lora.target_modules=[q_proj,v_proj],all-linear,'a,b'", "lora.r=8"])
    assert axes[0].values == ("[q_proj,v_proj]", "all-linear", "'a,b'")
    assert axes[1].values == ("8",)
    for bad, expected in [
        ("lora.r=8,8", "8 listed twice"),
        ("lora.r", "expected KEY.PATH=VALUE"),
        ("lora.r=8,", "an empty value"),
    ]:
        with pytest.raises(LoratoolError, match=expected):
            sweep_module.parse_vary([bad])
    with pytest.raises(LoratoolError, match="given twice"):
        sweep_module.parse_vary(["lora.r=4", "lora.r=8"])
