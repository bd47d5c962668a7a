"""Packing trains, with micro-batches sized from the data."""

from __future__ import annotations

import json
import math

import pytest


@pytest.mark.quick
def test_packing_trains_with_micro_batches_sized_from_the_data(tmp_path, tiny_llama, smoke_data, monkeypatch):
    """`loratool train` with packing: the trainer gets packed rows of max_length, as many per micro-batch
    as hold per_device_train_batch_size examples on average once packed, and trains."""
    from typer.testing import CliRunner

    from conftest import smoke_recipe, write_recipe
    from loratool.cli import app
    from loratool.train import sft as sft_config

    seen = {}
    build = sft_config.build_sft_config

    def recording(*args, **kwargs):
        seen["args"] = build(*args, **kwargs)
        seen["lengths"] = kwargs["train_lengths"]
        return seen["args"]

    monkeypatch.setattr("loratool.train.sft.build_sft_config", recording)
    out = tmp_path / "run"
    recipe = smoke_recipe(tiny_llama, smoke_data, out, data={"packing": True}, training={"max_steps": 2})
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp_path / "r.yaml", recipe))])
    assert result.exit_code == 0, result.output
    args, lengths = seen["args"], seen["lengths"]
    assert args.packing and args.max_length == 64
    assert len(lengths) == json.loads((out / "run.json").read_text())["data"]["train"]["rows"]
    expected = max(1, math.ceil(8 * sft_config.packed_rows(lengths, 64) / len(lengths)))
    assert args.per_device_train_batch_size == expected
    assert json.loads((out / "run.json").read_text())["train"]["global_step"] == 2
