"""Where `merge` and `export` of a checkpoint write by default: outside RUN/checkpoints/, which
save_total_limit rotates (a merge inside checkpoint-N would be deleted with it)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from helpers.merge import record, run_with_checkpoints
from loratool.cli import app
from loratool.errors import LoratoolError
from loratool.export.run import output_location as export_location
from loratool.merge import run_merge
from loratool.merge.run import output_location as merge_location

quiet = lambda _: None  # noqa: E731


@pytest.fixture
def run(tmp_path, tiny_llama):
    return run_with_checkpoints(tmp_path / "run", tiny_llama)


def test_merging_a_checkpoint_writes_beside_the_checkpoints(run):
    checkpoint = run / "checkpoints" / "checkpoint-12"
    out = run_merge(checkpoint, verify=False, log=quiet)
    assert out == run / "merged-checkpoint-12"
    assert record(out)["base_model"]["fingerprint_check"] == "match"
    assert not (checkpoint / "merged").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-12", "checkpoint-6"]


def test_a_run_still_merges_into_its_own_folder(run, tiny_llama):
    assert merge_location(None, run, tiny_llama) == run / "merged"


def test_exporting_a_checkpoint_writes_next_to_the_run(run, tmp_path):
    checkpoint = run / "checkpoints" / "checkpoint-12"
    assert export_location(None, checkpoint) == tmp_path / "run-checkpoint-12-gguf"
    assert export_location(None, checkpoint, "gguf-lora") == tmp_path / "run-checkpoint-12-gguf-lora"
    assert export_location(None, run) == tmp_path / "run-gguf"  # a run: unchanged


def test_an_output_over_the_checkpoint_is_still_refused(run, tiny_llama):
    checkpoint = run / "checkpoints" / "checkpoint-12"
    with pytest.raises(LoratoolError, match="would replace the adapter or the base model"):
        merge_location(run / "checkpoints", checkpoint, tiny_llama)
    with pytest.raises(LoratoolError, match="would overlap the source"):
        export_location(checkpoint / "gguf", checkpoint)


def test_the_help_names_the_checkpoint_defaults():
    merge_help = CliRunner().invoke(app, ["merge", "--help"], terminal_width=400)
    export_help = CliRunner().invoke(app, ["export", "--help"], terminal_width=400)
    assert "RUN/merged-checkpoint-N" in " ".join(merge_help.output.split())
    assert "RUN-checkpoint-N-gguf" in " ".join(export_help.output.split())


def test_a_checkpoint_as_target_points_at_where_its_merge_goes(run):
    from loratool.generate.target import resolve_target

    with pytest.raises(LoratoolError) as refused:
        resolve_target(run / "checkpoints" / "checkpoint-12")
    assert f"`loratool eval {run / 'merged-checkpoint-12'} --data FILE`" in refused.value.hint
