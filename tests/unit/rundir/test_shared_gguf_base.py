"""A run on a .gguf base, shared: adapter_config.json and the model card name the hub id the file was
converted from (the recipe's model.gguf_source, else the GGUF metadata llama.cpp writes), else the file's
name and sha256 — never a path on this machine; run.json keeps the local paths merge finds the base by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import LORATOOL_RUN, random_adapter
from loratool.merge import run_merge
from loratool.model.fingerprint import weights_fingerprint
from loratool.model.gguf_base import gguf_hub_id, gguf_record
from loratool.rundir.model_card import finish_adapter_dir
from loratool.rundir.records import RunRecord

HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"
CACHE = "/home/me/.cache/loratool/gguf/ab12cd"
FILE = "/tmp/probe/SmolLM2-135M-Instruct-Q8_0.gguf"


def gguf_with(path: Path, metadata: dict[str, str]) -> Path:
    """A GGUF file holding only these general.* strings (no tensors): what gguf_hub_id reads."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        writer.add_string(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    ("metadata", "hub_id"),
    [
        ({"general.source.url": f"https://huggingface.co/{HUB}"}, HUB),
        ({"general.source.repo_url": f"https://huggingface.co/{HUB}/"}, HUB),
        ({"general.source.huggingface.repository": HUB}, HUB),  # older llama.cpp
        (
            {"general.repo_url": f"https://huggingface.co/{HUB}", "general.url": "https://arxiv.org/abs/1"},
            HUB,
        ),
        ({"general.url": "https://arxiv.org/abs/2502.02737", "general.basename": "SmolLM2"}, None),
        ({"general.source.url": "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF"}, None),
        ({"general.url": "example.com/paper"}, None),  # a bare org/name only under huggingface.repository
        ({"general.name": "SmolLM2 135M Instruct"}, None),
    ],
)
def test_the_hub_id_is_read_from_the_metadata_llama_cpp_writes(tmp_path, metadata, hub_id):
    path = gguf_with(tmp_path / "model.gguf", metadata)
    assert gguf_hub_id(path) == hub_id
    assert gguf_record(path)["hub_id"] == hub_id


def finished(folder: Path, gguf: dict, recipe: dict | None = None) -> tuple[dict, str]:
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": CACHE, "r": 8}))
    manifest = {
        "base_model": {
            "id": FILE,
            "resolved_path": CACHE,
            "gguf": {"file": FILE, "sha256": "ab" * 32, **gguf},
        },
        "train": {"global_step": 500, "tokens_trained": 2_000_000},
    }
    recipe = {"lora": {"r": 8, "lora_alpha": 16}, "training": {"output_dir": "out/my-run"}, **(recipe or {})}
    finish_adapter_dir(folder, recipe, RunRecord.from_dict(manifest, folder))
    return json.loads((folder / "adapter_config.json").read_text()), (folder / "README.md").read_text()


def test_a_gguf_base_from_a_known_hub_id_is_named_by_it(tmp_path):
    config, card = finished(tmp_path, {"hub_id": HUB})
    assert config["base_model_name_or_path"] == HUB
    assert f"base_model: {HUB}" in card
    assert f"vllm serve {HUB} --enable-lora --lora-modules my-run=./my-run" in card
    assert f"converted from {HUB}" in card and "sha256 `" + "ab" * 32 in card
    assert "loratool merge --adapter my-run --base ./SmolLM2-135M-Instruct-Q8_0.gguf" in card
    assert "/tmp/" not in card and ".cache" not in card


def test_the_recipe_names_the_hub_id_when_the_file_does_not(tmp_path):
    config, card = finished(tmp_path, {"hub_id": None}, {"model": {"gguf_source": "some-org/some-model"}})
    assert config["base_model_name_or_path"] == "some-org/some-model"
    assert "base_model: some-org/some-model" in card


def test_an_unknown_gguf_base_is_named_by_its_file_and_sha256(tmp_path):
    config, card = finished(tmp_path, {})  # a run.json from before gguf.hub_id was recorded
    assert config["base_model_name_or_path"] == "SmolLM2-135M-Instruct-Q8_0.gguf"
    assert "base_model:" not in card  # no hub id to give the Hub
    assert "`SmolLM2-135M-Instruct-Q8_0.gguf` (sha256 `" + "ab" * 32 + "`)" in card
    assert 'AutoModelForCausalLM.from_pretrained(".", gguf_file="SmolLM2-135M-Instruct-Q8_0.gguf")' in card
    assert (
        "loratool merge --adapter my-run --base ./SmolLM2-135M-Instruct-Q8_0.gguf --output my-run-merged"
        in card
    )
    assert "vllm serve ./my-run-merged" in card and "vllm serve /" not in card
    assert "/tmp/" not in card and ".cache" not in card


def test_merge_still_finds_the_base_by_run_json(tmp_path, tiny_llama):
    """adapter_config.json names a base this machine does not have; run.json's resolved_path is used."""
    run = random_adapter(tiny_llama, tmp_path / "run", 1, target_modules=["q_proj"])
    base = {"id": FILE, "resolved_path": str(tiny_llama), "fingerprint": weights_fingerprint(tiny_llama)}
    (run / "run.json").write_text(
        json.dumps({**LORATOOL_RUN, "status": "complete", "base_model": {**base, "gguf": {"file": FILE}}})
    )
    finish_adapter_dir(run, {}, RunRecord.from_dict(json.loads((run / "run.json").read_text()), run))
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == Path(FILE).name
    merged = json.loads((run_merge(run, verify=False, log=lambda _: None) / "merge.json").read_text())
    assert merged["base_model"]["path"] == str(tiny_llama)
    assert merged["base_model"]["fingerprint_check"] == "match"


def test_a_shared_adapter_naming_its_gguf_file_loads_with_generate(tmp_path, tiny_llama):
    """On another machine: no run.json, and adapter_config.json names a .gguf file that is not here."""
    from loratool.generate.run import load_adapters
    from loratool.generate.target import resolve_target

    adapter = random_adapter(tiny_llama, tmp_path / "shared", 1, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": Path(FILE).name})
    )
    loaded = load_adapters(resolve_target(tiny_llama), [f"shared={adapter}"], lambda _: None, warm_up=False)
    assert loaded.names == ["shared"]
