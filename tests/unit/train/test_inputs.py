"""Every input of a recipe resolved before anything loads (loratool/train/inputs.py): missing
paths name each place looked, an unreachable hub is found by one short probe and reported with what to
do, and all problems come in one error. No test touches the network: the hub is a closed or open
127.0.0.1 port."""

from __future__ import annotations

import socket

import pytest

from helpers.inputs import recipe_in
from loratool.errors import LoratoolError
from loratool.recipe import load_recipe
from loratool.train import inputs
from loratool.train.inputs import check_inputs, hub_unreachable

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")


def closed_port() -> int:
    """A local port nothing listens on: bound, then released (a connect to it is refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def online(monkeypatch, tmp_path):
    """As on a machine where HF_HUB_OFFLINE is not set, with an empty hub cache of its own."""
    for name in (*OFFLINE_VARIABLES, *PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    return tmp_path / "hub-cache"


@pytest.fixture()
def unreachable_hub(online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    return online


def cache_model(cache, repo_id: str) -> None:
    """The layout huggingface_hub writes: refs/main names the snapshot that holds the files."""
    folder = cache / f"models--{repo_id.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("a" * 40)
    snapshot = folder / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")


def test_every_missing_local_input_in_one_error_naming_each_place_looked(tmp_path, monkeypatch, smoke_data):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes" / "data").mkdir(parents=True)
    (tmp_path / "recipes" / "data" / "train.jsonl").write_text("")
    path = recipe_in(
        tmp_path / "recipes",
        "./models/mine",
        "data/trian.jsonl",
        smoke_data,
        "data/extra.csv",
        tmp_path=tmp_path,
    )
    with pytest.raises(LoratoolError) as err:
        check_inputs(load_recipe(path))
    message, hint = err.value.message, err.value.hint
    assert message.startswith("3 inputs of the recipe cannot be resolved:")
    assert f"base model not found: {tmp_path / 'models' / 'mine'} is not a directory" in message
    assert f"data.train[0].path: data source not found: {tmp_path / 'data' / 'trian.jsonl'}" in message
    assert f"data.train[2].path: data source not found: {tmp_path / 'data' / 'extra.csv'}" in message
    assert "data.train[1]" not in message  # the file that exists
    # Both places each relative path was looked for, and what the nearest directory holds (the typo shows).
    assert f"at {tmp_path / 'recipes' / 'models' / 'mine'} (next to the recipe)" in hint
    assert f"and {tmp_path / 'models' / 'mine'} (working directory)" in hint
    assert f"at {tmp_path / 'recipes' / 'data' / 'trian.jsonl'} (next to the recipe)" in hint
    assert f"{tmp_path / 'recipes' / 'data'} contains: train.jsonl" in hint


def test_probe_tells_a_closed_port_from_a_listening_one(online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    assert "refused" in hub_unreachable()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub_unreachable() is None


def test_probe_goes_through_the_https_proxy_when_one_is_set(online, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://huggingface.co")
    port = closed_port()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    assert hub_unreachable() == f"connection refused through the proxy 127.0.0.1:{port}"


def test_unreachable_hub_names_every_hub_input_and_what_to_do(unreachable_hub, tmp_path, smoke_data):
    path = recipe_in(tmp_path / "r", "someorg/some-model", "someorg/some-data", smoke_data, tmp_path=tmp_path)
    with pytest.raises(LoratoolError) as err:
        check_inputs(load_recipe(path))
    message, hint = err.value.message, err.value.hint
    assert message.startswith("2 inputs of the recipe cannot be resolved:")
    assert "base_model: 'someorg/some-model' is read as a hub id, and the hub (http://127.0.0.1:" in message
    assert "cannot be reached (connection refused); it is not in the local cache" in message
    assert "data.train[0].path: 'someorg/some-data' is read as a hub id" in message
    assert "HF_HUB_OFFLINE=1" in hint and "hf auth login" in hint and "local paths" in hint


def test_unreachable_hub_with_everything_cached_says_set_offline(unreachable_hub, tmp_path, smoke_data):
    cache_model(unreachable_hub, "someorg/some-model")
    path = recipe_in(tmp_path / "r", "someorg/some-model", smoke_data, tmp_path=tmp_path)
    with pytest.raises(LoratoolError) as err:
        check_inputs(load_recipe(path))
    assert (
        "cannot be reached (connection refused); it is in the local cache (and no file" in err.value.message
    )
    assert err.value.hint.startswith("everything needed is in the cache: set HF_HUB_OFFLINE=1")


def test_offline_mode_needs_the_cache_and_never_probes(online, monkeypatch, tmp_path, smoke_data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(inputs, "hub_unreachable", lambda: pytest.fail("probed the hub while offline"))
    path = recipe_in(tmp_path / "r", "someorg/some-model", smoke_data, tmp_path=tmp_path)
    with pytest.raises(LoratoolError) as err:
        check_inputs(load_recipe(path))
    assert err.value.message.startswith(
        "base_model: 'someorg/some-model' is read as a hub id, HF_HUB_OFFLINE is set and it is not in the "
        "local cache"
    )
    assert "hf download" in err.value.hint
    cache_model(online, "someorg/some-model")
    check_inputs(load_recipe(path))  # cached: nothing to report


def test_reachable_hub_and_local_inputs_pass(online, monkeypatch, tmp_path, tiny_llama, smoke_data):
    monkeypatch.setattr(inputs, "hub_unreachable", lambda: pytest.fail("probed the hub for local inputs"))
    check_inputs(load_recipe(recipe_in(tmp_path / "r", tiny_llama, smoke_data, tmp_path=tmp_path)))
    monkeypatch.setattr(inputs, "hub_unreachable", lambda: None)
    check_inputs(load_recipe(recipe_in(tmp_path / "s", "someorg/m", smoke_data, tmp_path=tmp_path)))
