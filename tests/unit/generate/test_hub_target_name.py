"""A TARGET given as a hub id loads from its cache snapshot but keeps the hub id as its name (serve's model
name, messages): the snapshot's directory is a commit hash."""

from __future__ import annotations

import shutil

import pytest

from loratool.generate.run import plain_name
from loratool.generate.target import resolve_target
from loratool.serve.served import base_name

COMMIT = "e0c7" + "0" * 36


@pytest.fixture
def cached(tmp_path, tiny_llama, monkeypatch):
    """tiny_llama as the hub's some-org/tiny in a private Hugging Face cache."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    repo = hub / "models--some-org--tiny"
    shutil.copytree(tiny_llama, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.chdir(tmp_path)
    return repo / "snapshots" / COMMIT


def test_a_hub_id_target_is_named_by_its_hub_id(cached):
    target = resolve_target("some-org/tiny")
    assert target.path == cached  # loaded from the snapshot
    assert (target.kind, target.name, target.base_id) == ("base", "some-org/tiny", "some-org/tiny")
    assert base_name(target, plain_name(target)) == "some-org/tiny"  # served as, not as e0c7000…


def test_a_local_target_keeps_its_directory_name(cached):
    target = resolve_target(cached)
    assert target.hub_id is None
    assert target.name == COMMIT and base_name(target, plain_name(target)) == COMMIT


def test_eval_of_a_hub_id_target_reports_beside_you_under_its_name(cached, tmp_path):
    from loratool.eval.run import output_dir

    target = resolve_target("some-org/tiny")
    assert output_dir(target, None) == tmp_path / "eval-some-org--tiny"  # not eval-e0c7000…
