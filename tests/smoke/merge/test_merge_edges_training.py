"""A checkpoint of a real `loratool train` run used as the adapter: its seal carries the base fingerprint,
`merge` checks the base against it (a base of the same shape with other weights is refused), and merges
into the run's own base by default — through the real CLI."""

from __future__ import annotations

import json

from conftest import REPO, smoke_recipe, write_recipe
from helpers.merge import merge_cli, record
from helpers.train import train_cli
from loratool.model.fingerprint import weights_fingerprint
from loratool.rundir.records import CHECKPOINT_SEAL


def test_a_trained_checkpoint_is_checked_against_its_base(tmp_path, tiny_llama, tiny_model_factory):
    data = REPO / "recipes" / "data" / "smoke.jsonl"
    recipe = smoke_recipe(tiny_llama, data, tmp_path / "run", training={"max_steps": 4, "save_steps": 2})
    trained = train_cli(write_recipe(tmp_path / "recipe.yaml", recipe))
    assert trained.exit_code == 0, trained.output
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    seal = json.loads((checkpoint / CHECKPOINT_SEAL).read_text())
    assert seal["base_fingerprint"] == weights_fingerprint(tiny_llama)

    other = tiny_model_factory("llama", seed=7)  # same shapes, other weights
    refused = merge_cli("--adapter", checkpoint, "--base", other, "--no-verify")
    assert refused.exit_code == 1
    assert (
        "error: the base model is not the one this adapter was trained on: checkpoint-2's seal "
        f"({CHECKPOINT_SEAL}) records {tiny_llama}"
    ) in refused.output
    assert not (tmp_path / "run" / "merged-checkpoint-2").exists()

    merged = merge_cli("--adapter", checkpoint)  # the run's base, and verified against it
    assert merged.exit_code == 0, merged.output
    merged_dir = tmp_path / "run" / "merged-checkpoint-2"  # outside the checkpoint: rotation keeps it
    assert record(merged_dir)["base_model"]["fingerprint_check"] == "match"
    assert record(merged_dir)["verification"]["passed"]
