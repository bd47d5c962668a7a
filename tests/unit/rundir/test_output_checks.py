"""The checks every command shares: free disk space before an output is written (rundir/outputs.py), and
config.json read in one place (model/checkpoint.py)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest

from loratool.errors import LoratoolError
from loratool.model.checkpoint import read_config
from loratool.rundir.outputs import FREE_SPACE_MARGIN, check_free_space

usage = namedtuple("usage", "total used free")


def test_free_space_is_asked_of_the_nearest_folder_that_exists(tmp_path, monkeypatch):
    asked = []

    def disk_usage(path):
        asked.append(path)
        return usage(10**12, 0, 10**9)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    check_free_space(tmp_path / "not" / "yet", 10**9 - FREE_SPACE_MARGIN, what="x", hint="h")
    assert asked == [tmp_path]


def test_too_little_free_space_is_refused_with_what_needs_it(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    with pytest.raises(LoratoolError) as err:
        check_free_space(tmp_path, 3 * 10**9, what="the export", detail=" (merge + GGUF)", hint="free some")
    assert err.value.message == (
        f"not enough disk space in {tmp_path}: the export needs about 3.00 GB (merge + GGUF), and 0.0 MB is free"
    )
    assert err.value.hint == "free some"


def test_read_config_names_the_file_when_it_is_missing_or_not_json(tmp_path):
    with pytest.raises(LoratoolError, match="has no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(LoratoolError, match=f"{tmp_path / 'config.json'} is not valid JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(LoratoolError, match="is not a JSON object"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert read_config(tmp_path) == {"model_type": "llama"}
