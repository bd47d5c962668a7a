"""Paths that exist but are not what is wanted — a FIFO, a device, a symbolic link loop or a broken link, a
directory where a .gguf file is wanted, a file where a model directory is wanted — are named for what they
are, as data sources, base models and tokenizers, and a FIFO is never opened (that would block)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import smoke_recipe, write_recipe
from loratool.data.sources import open_source
from loratool.errors import LoratoolError
from loratool.model.load import check_base_model_exists, load_tokenizer, path_kind
from loratool.recipe import DataSource, ModelSection, load_recipe
from loratool.train.inputs import check_inputs

pytestmark = pytest.mark.timeout(60)  # a FIFO opened for reading would block until then


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_loop(path: Path) -> Path:
    os.symlink(path.name, path)  # a link to itself
    return path


def make_broken(path: Path) -> Path:
    os.symlink("nowhere.jsonl", path)
    return path


@pytest.fixture(
    params=[
        ("fifo", make_fifo, "a FIFO (named pipe)"),
        ("loop", make_loop, "a symbolic link loop"),
        ("broken", make_broken, "a broken symbolic link (to nowhere.jsonl)"),
        ("device", lambda _: Path("/dev/zero"), "a character device"),
    ],
    ids=lambda p: p[0],
)
def odd_path(request, tmp_path) -> tuple[Path, str]:
    _, make, kind = request.param
    return make(tmp_path / "train.jsonl"), kind


def test_path_kind_says_what_is_there_and_nothing_for_files_and_directories(tmp_path, odd_path):
    path, kind = odd_path
    assert path_kind(path) == kind
    (tmp_path / "file.jsonl").write_text("{}\n")
    assert path_kind(tmp_path / "file.jsonl") is None and path_kind(tmp_path) is None
    assert path_kind(tmp_path / "missing") is None


def test_a_data_source_that_is_not_a_file_is_named_for_what_it_is(odd_path):
    path, kind = odd_path
    with pytest.raises(LoratoolError) as info:
        open_source(DataSource(path=str(path)))
    assert (
        info.value.message == f"data source {os.path.abspath(path)} is {kind}, not a data file or directory"
    )
    assert "not found" not in info.value.message
    assert ("the link" in info.value.hint) is ("link" in kind)


def test_check_inputs_names_every_input_that_is_not_what_is_wanted(tmp_path, smoke_data):
    fifo = make_fifo(tmp_path / "pipe.jsonl")
    loop = make_loop(tmp_path / "base")
    gguf = tmp_path / "model.gguf"
    gguf.mkdir()
    recipe = smoke_recipe(loop, fifo, tmp_path / "out", model={"tokenizer": "/dev/zero"})
    recipe["data"]["train"].append({"path": str(smoke_data)})
    with pytest.raises(LoratoolError) as info:
        check_inputs(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    message = info.value.message
    assert message.startswith("3 inputs of the recipe cannot be resolved:")
    assert f"base model {loop} is a symbolic link loop, not a model directory" in message
    assert "model.tokenizer /dev/zero is a character device, not a model directory" in message
    assert f"data.train[0].path: {fifo} is a FIFO (named pipe), not a data file or directory" in message
    assert "data.train[1]" not in message and "not found" not in message

    recipe = smoke_recipe(gguf, smoke_data, tmp_path / "out")
    with pytest.raises(LoratoolError) as info:
        check_inputs(load_recipe(write_recipe(tmp_path / "g.yaml", recipe)))
    assert info.value.message == f"base model {gguf} is a directory, not a .gguf file"


def test_the_loaders_say_the_same_without_check_inputs(tmp_path, tiny_llama):
    # `loratool data`, `eval` and `generate` load the tokenizer without the input checks of `train`.
    fifo = make_fifo(tmp_path / "model")
    with pytest.raises(LoratoolError, match=r"base model .*/model is a FIFO \(named pipe\), not a model dir"):
        load_tokenizer(str(fifo), ModelSection(), lambda _: None)
    config = tiny_llama / "config.json"
    with pytest.raises(LoratoolError) as info:
        check_base_model_exists(str(config))
    assert info.value.message == f"base model {config} is a file, not a model directory"
    assert "config.json" in info.value.hint
    with pytest.raises(LoratoolError, match="model.tokenizer .* is a symbolic link loop"):
        load_tokenizer(str(tiny_llama), ModelSection(tokenizer=str(make_loop(tmp_path / "tok"))), print)
