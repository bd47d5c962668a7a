"""Runs you can trust, through the CLI without training: another tool's run.json, a merge output
holding user files, a usage error, an output_dir that is a file."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conftest import random_adapter, smoke_recipe, write_recipe
from helpers.run_trust import make_recipe, train
from loratool.cli import app


def test_another_tools_run_json_is_never_a_loratool_run(tmp_path, tiny_llama, smoke_data):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("key")
    (home / "run.json").write_text(json.dumps({"status": "complete", "files": [".ssh"]}))
    recipe = write_recipe(tmp_path / "r.yaml", smoke_recipe(tiny_llama, smoke_data, home))
    for args in ((), ("--overwrite",), ("--resume",)):
        result = train(recipe, *args)
        assert result.exit_code == 1
        assert "loratool did not write" in result.output or "no complete checkpoint" in result.output
    assert (home / ".ssh" / "id_ed25519").read_text() == "key"


def test_merge_overwrite_refuses_an_output_holding_user_files(tmp_path, tiny_llama):
    adapter = random_adapter(tiny_llama, tmp_path / "adapter", target_modules=["q_proj"])
    out = tmp_path / "merged"
    run = CliRunner().invoke(
        app, ["merge", "--adapter", str(adapter), "--base", str(tiny_llama), "--output", str(out)]
    )
    assert run.exit_code == 0, run.output
    again = CliRunner().invoke(
        app, ["merge", "--adapter", str(adapter), "--base", str(tiny_llama), "--output", str(out)]
    )
    assert again.exit_code == 1 and "already exists" in again.output
    (out / "NOTES.md").write_text("mine")
    forced = CliRunner().invoke(
        app,
        ["merge", "--adapter", str(adapter), "--base", str(tiny_llama), "--output", str(out), "--overwrite"],
    )
    assert forced.exit_code == 1 and "NOTES.md" in forced.output
    assert (out / "NOTES.md").read_text() == "mine" and (out / "merge.json").is_file()


def test_usage_error_exit_code():
    assert CliRunner().invoke(app, ["train", "--no-such-option", "x.yaml"]).exit_code == 2


def test_output_dir_that_is_a_file_is_refused_before_anything_loads(tmp_path, tiny_llama, smoke_data):
    target = tmp_path / "out"
    target.write_text("not a directory")
    result = train(make_recipe(tmp_path, tiny_llama, smoke_data), "--dry-run")
    assert result.exit_code == 1 and "is a file, not a directory" in result.output
    assert target.read_text() == "not a directory"
