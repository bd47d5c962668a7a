"""Merge, eval, generate and combine refuse a base with one tensor negated where the old
sampled fingerprint saw nothing, and accept old records of the same base — on a trained tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import REPO, smoke_recipe, write_recipe

# a fixture, imported for pytest to find in this module
from helpers.fingerprint import legacy_windows as legacy_windows
from helpers.fingerprint import negate_tensor, old_sampled_fingerprint, sampled_windows
from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.model import fingerprint
from loratool.model.fingerprint import fingerprint_scheme, weights_fingerprint

# --- merge, eval and generate check the base through it --------------------------------------------------


def train_run(tmp: Path, base: Path) -> Path:
    recipe = smoke_recipe(
        base, REPO / "recipes" / "data" / "smoke.jsonl", tmp / "run", training={"max_steps": 2}
    )
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return tmp / "run"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama) -> tuple[Path, Path]:
    """(run, base): a short real training run on a base copy of its own, which tests modify and restore."""
    tmp = tmp_path_factory.mktemp("fingerprint-run")
    base = shutil.copytree(tiny_llama, tmp / "base")
    return train_run(tmp, base), base


def test_merge_and_eval_refuse_a_base_with_one_tensor_negated(trained, tmp_path, legacy_windows):
    from loratool.generate.target import check_run_base, resolve_target

    run, base = trained
    shard = base / "model.safetensors"
    pristine = shard.read_bytes()
    recorded = json.loads((run / "run.json").read_text())["base_model"]["fingerprint"]
    assert fingerprint_scheme(recorded) == fingerprint.SCHEME
    legacy = fingerprint._sampled_fingerprint(base)
    try:
        name = negate_tensor(shard, sampled_windows(shard, fingerprint._SAMPLE))
        assert fingerprint._sampled_fingerprint(base) == legacy  # what 0.1.0 would have compared

        merged = CliRunner().invoke(app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "m")])
        assert merged.exit_code == 1, merged.output
        assert "error: the base model is not the one this adapter was trained on" in merged.output, name
        assert not (tmp_path / "m").exists()
        forced = CliRunner().invoke(
            app, ["merge", "--adapter", str(run), "--output", str(tmp_path / "m"), "--force", "--no-verify"]
        )
        assert forced.exit_code == 0, forced.output
        assert json.loads((tmp_path / "m" / "merge.json").read_text())["base_model"]["fingerprint_check"] == (
            "mismatch, merged with --force"
        )

        with pytest.raises(LoratoolError, match="is not the one the run in"):  # eval, generate, chat
            check_run_base(resolve_target(run), log=lambda _: None)
    finally:
        shard.write_bytes(pristine)
    check_run_base(resolve_target(run), log=lambda _: None)  # restored: accepted again


def test_merge_accepts_an_old_sampled_record_of_the_same_base(trained, tmp_path):
    run, base = trained
    old = shutil.copytree(run, tmp_path / "old-run")
    manifest = json.loads((old / "run.json").read_text())
    manifest["base_model"]["fingerprint"] = old_sampled_fingerprint(base, 64 * 2**20, 2**20)
    (old / "run.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(
        app, ["merge", "--adapter", str(old), "--output", str(tmp_path / "m"), "--no-verify"]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "m" / "merge.json").read_text())["base_model"]
    assert record["fingerprint_check"] == "match"
    assert record["fingerprint"] == weights_fingerprint(base)  # merge.json records the current scheme


def test_generate_compares_adapters_recorded_in_either_scheme(trained, tmp_path, tiny_model_factory):
    from loratool.generate.target import resolve_target

    run, base = trained
    as_base = resolve_target(base)
    assert as_base.base_matches(weights_fingerprint(base))
    assert as_base.base_matches(old_sampled_fingerprint(base, 64 * 2**20, 2**20))
    other = tiny_model_factory("llama", seed=1)
    assert not as_base.base_matches(weights_fingerprint(other))
    assert not as_base.base_matches(old_sampled_fingerprint(other, 64 * 2**20, 2**20))
    # A run target recorded with the new scheme, another adapter's run with the old one: checked against
    # the run's base weights.
    as_run = resolve_target(run)
    assert as_run.base_matches(old_sampled_fingerprint(base, 64 * 2**20, 2**20))
    assert not as_run.base_matches(old_sampled_fingerprint(other, 64 * 2**20, 2**20))


def test_combine_refuses_a_base_with_one_tensor_negated(trained, tmp_path, legacy_windows):
    run, base = trained
    other = shutil.copytree(base, tmp_path / "other-base")
    negate_tensor(
        other / "model.safetensors", sampled_windows(other / "model.safetensors", fingerprint._SAMPLE)
    )
    twin = shutil.copytree(run, tmp_path / "twin")
    args = ["merge", "--adapter", str(run), "--adapter", str(twin), "--adapter-only"]
    out = tmp_path / "combined"
    refused = CliRunner().invoke(app, [*args, "--base", str(other), "--adapter-output", str(out)])
    assert refused.exit_code == 1, refused.output
    assert "error: the base model is not the one this adapter was trained on" in refused.output
    assert not out.exists()
    accepted = CliRunner().invoke(app, [*args, "--base", str(base), "--adapter-output", str(out)])
    assert accepted.exit_code == 0, accepted.output
