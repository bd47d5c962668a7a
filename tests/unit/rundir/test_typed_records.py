"""Each record loratool writes has one typed owner: every key written is read back into a typed field
(so a field added to the writer and not to the reader fails here), the JSON is what the writer produced,
and a record from another loratool version (unknown keys, odd values) reads without a crash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from loratool.adapter.files import Adapter
from loratool.export.record import RECORD as EXPORT_JSON
from loratool.export.record import ExportRecord, ExportSource
from loratool.merge.record import RECORD as MERGE_JSON
from loratool.merge.record import MergeRecord
from loratool.merge.run import describe_merge
from loratool.rundir.outputs import MARKER, RECORD_OF_KIND, write_record
from loratool.rundir.records import (
    MANIFEST,
    BaseModelRecord,
    RunRecord,
    TrainingRun,
    read_run,
    read_training_run,
)


def assert_every_key_typed(written: dict[str, Any], read: Any, where: str = "") -> None:
    """Every key of `written` (loratool's marker aside) is a field of the typed `read`, holding the
    value written; nested records are checked key by key too."""
    names = {f.name for f in dataclasses.fields(read)} - {"raw"}
    for key, value in written.items():
        if key == MARKER:
            continue
        assert key in names, f"{where}{key}: written, but {type(read).__name__} has no field for it"
        got = getattr(read, key)
        if dataclasses.is_dataclass(got):
            assert isinstance(value, dict), f"{where}{key}"
            assert_every_key_typed(value, got, f"{where}{key}.")
        else:
            assert got == value, f"{where}{key}: written {value!r}, read {got!r}"


def assert_no_field_left_at_default(record: Any) -> None:
    """The record built here sets every field: a new field must be added to this test's record too."""
    for f in dataclasses.fields(record):
        if f.name in ("files", "raw"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        assert getattr(record, f.name) != default, f"{type(record).__name__}.{f.name} is left at its default"


def written(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text())


# --- merge.json ----------------------------------------------------------------------------------------


def merge_record(tmp_path: Path) -> MergeRecord:
    """merge.json as `loratool merge` builds it (describe_merge), with verification and time added."""
    adapter = Adapter(
        tmp_path / "adapter",
        {
            "r": 8,
            "lora_alpha": 16,
            "use_rslora": True,
            "use_dora": True,
            "modules_to_save": ["lm_head"],
            "base_model_name_or_path": "org/base",
        },
        {},
    )
    run = TrainingRun(
        RunRecord(tmp_path / "adapter", "complete", base_model=BaseModelRecord(quantization="4bit")), None
    )
    quantized = SimpleNamespace(to_dict=lambda: {"quant_type": "nf4", "double_quant": True})
    identity = {"fingerprint": "sha256:aa", "recorded_fingerprint": "sha256:aa", "fingerprint_check": "match"}
    record = describe_merge(
        adapter, run, "org/base", tmp_path / "base", identity, "bfloat16", "dequantized", quantized,
        {"merged": 4, "from_base": 10},
    )  # fmt: skip
    return dataclasses.replace(record, verification={"passed": True, "probes": "x"}, wall_time_s=1.5)


def test_every_key_of_merge_json_is_read_into_a_typed_field(tmp_path):
    record = merge_record(tmp_path)
    assert_no_field_left_at_default(record)
    assert_no_field_left_at_default(record.adapter)
    assert_no_field_left_at_default(record.base_model)
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    write_record(folder, MERGE_JSON, record.to_dict(), kind="merge")  # as Output.place writes it

    on_disk = written(folder, MERGE_JSON)
    assert list(on_disk) == [MARKER, *record.to_dict(), "files"]  # the writer's keys, in its order
    read = MergeRecord.read(folder)
    assert read is not None and read == record
    assert_every_key_typed(on_disk, read)
    assert read.files == ["merge.json", "model.safetensors"] and read.raw == on_disk
    assert read.to_dict() == {k: v for k, v in on_disk.items() if k not in (MARKER, "files")}


def test_merge_json_keeps_its_keys_and_values():
    """The JSON other tools read: names and values as loratool has always written them."""
    record = MergeRecord.from_dict(
        {"status": "complete", "adapter": {"path": "/a", "r": 8}, "base_model": {"id": "b", "path": "/b"}}
    )
    value = record.to_dict()
    assert list(value) == [
        "status", "loratool_version", "created_at", "adapter", "base_model", "dtype", "qlora", "tensors",
        "versions", "verification", "wall_time_s",
    ]  # fmt: skip
    assert list(value["adapter"]) == [
        "path", "loratool_run", "r", "lora_alpha", "use_rslora", "use_dora", "modules_to_save",
        "base_model_name_or_path",
    ]  # fmt: skip
    assert list(value["base_model"]) == [
        "id",
        "path",
        "fingerprint",
        "recorded_fingerprint",
        "fingerprint_check",
    ]


def test_a_merge_json_from_another_version_reads_without_a_crash(tmp_path):
    odd = {
        MARKER: {"kind": "merge", "format": 1},
        "files": ["merge.json"],
        "status": "complete",
        "adapter": None,
        "base_model": {"id": "b", "added_later": 1},
        "tensors": [1, 2],
        "qlora": "yes",
        "a_key_from_a_newer_loratool": {"x": 1},
    }
    (tmp_path / MERGE_JSON).write_text(json.dumps(odd))
    read = MergeRecord.read(tmp_path)
    assert read is not None and read.complete
    assert (
        read.adapter.path is None and read.base_model.id == "b" and read.tensors == {} and read.qlora is None
    )
    assert read.raw["a_key_from_a_newer_loratool"] == {"x": 1}


def test_a_merge_json_without_the_marker_is_not_a_merge(tmp_path):
    (tmp_path / MERGE_JSON).write_text(json.dumps({"status": "complete", "files": ["merge.json"]}))
    assert MergeRecord.read(tmp_path) is None
    assert MergeRecord.read(tmp_path / "absent") is None


# --- export.json ---------------------------------------------------------------------------------------


def test_every_key_of_export_json_is_read_into_a_typed_field(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    write_record(merged, MERGE_JSON, merge_record(tmp_path).to_dict(), kind="merge")
    merge = MergeRecord.read(merged)
    record = ExportRecord(
        status="complete",
        loratool_version="9.9",
        created_at="2026-01-01T00:00:00+0000",
        source=ExportSource(
            path=str(merged),
            kind="model",
            merge=merge,
            base={"name": "org/base", "fingerprint_check": "match"},
        ),
        format="gguf",
        outtype="q8_0",
        file="merged.q8_0.gguf",
        bytes=123,
        sha256="ab" * 32,
        modelfile="Modelfile",
        versions={"gguf": "0.10"},
        verification={"passed": True},
        wall_time_s=2.5,
    )
    assert_no_field_left_at_default(record)
    assert_no_field_left_at_default(record.source)
    out = tmp_path / "gguf"
    out.mkdir()
    write_record(out, EXPORT_JSON, record.to_dict(), kind="export")

    on_disk = written(out, EXPORT_JSON)
    assert list(on_disk) == [MARKER, *record.to_dict(), "files"]
    assert on_disk["source"]["merge"] == written(merged, MERGE_JSON)  # merge.json copied whole: the chain
    read = ExportRecord.read(out)
    assert read is not None and read == record
    assert_every_key_typed(on_disk, read)
    assert read.to_dict() == {k: v for k, v in on_disk.items() if k not in (MARKER, "files")}


def test_an_export_json_from_another_version_reads_without_a_crash(tmp_path):
    odd = {MARKER: {"kind": "export", "format": 1}, "files": [], "source": "x", "versions": None, "new": 1}
    (tmp_path / EXPORT_JSON).write_text(json.dumps(odd))
    read = ExportRecord.read(tmp_path)
    assert read is not None and read.source == ExportSource() and read.versions == {} and read.raw["new"] == 1


def test_the_record_names_are_the_ones_outputs_checks():
    assert (MERGE_JSON, EXPORT_JSON) == (RECORD_OF_KIND["merge"], RECORD_OF_KIND["export"])


# --- run.json ------------------------------------------------------------------------------------------

# Every key train writes into run.json (train/record.py, rundir/records.py RunDir): keep it in step.
RUN_JSON = {
    MARKER: {"kind": "run", "format": 1},
    "loratool_version": "9.9",
    "versions": {"torch": "2.9", "transformers": "5.0"},
    "python": "3.11.9",
    "command": ["loratool", "train", "r.yaml"],
    "started_at": "2026-01-01T00:00:00+0000",
    "base_model": {
        "id": "/models/base.gguf",
        "revision": "main",
        "resolved_path": "/cache/gguf/ab",
        "fingerprint": "sha256:aa",
        "quantization": "4bit",
        "gguf": {"file": "/models/base.gguf", "sha256": "ab"},
    },
    "hardware": {"device": "cpu", "platform": "Linux"},
    "world_size": 1,
    "effective_batch_size": 8,
    "tokenizer_sha256": "cd",
    "data": {"train": {"rows": 10}, "max_length": 64},
    "stage": "dpo",
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "reference": "the base", "init_adapter": None},
    "smoke": {"of_base_model": "org/big", "changes": []},
    "adapter_init": {"method": "pissa", "mergeable": True},
    "train": {"global_step": 2, "train_loss": 1.5, "final_eval_loss": None},
    "adalora": {"init_r": 12, "target_r": 8},
    "peak_memory_bytes": {"process_rss": 1000},
    "wall_time_s": 3.5,
    "finished_at": "2026-01-01T00:01:00+0000",
    "resumes": [{"from_checkpoint": "checkpoint-2", "step": 2}],
    "status": "failed",
    "error": "RuntimeError: boom",
    "files": ["run.json", "recipe.yaml"],
}


def test_every_key_of_run_json_is_read_into_a_typed_field(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(RUN_JSON))
    read = read_run(tmp_path)
    assert read is not None
    assert_every_key_typed(RUN_JSON, read)
    assert read.raw == RUN_JSON and read.base_model.to_dict() == RUN_JSON["base_model"]
    assert RunRecord.from_dict(RUN_JSON, tmp_path) == read  # the record train is still building reads alike


def test_a_run_json_from_another_version_reads_without_a_crash(tmp_path):
    odd = {"base_model": "x", "train": None, "dpo": "odd", "resumes": None, "new_key": 1}
    read = RunRecord.from_dict(odd, tmp_path)
    assert read.base_model == BaseModelRecord() and read.train == {} and read.dpo is None
    assert read.resumes == [] and read.raw["new_key"] == 1
    assert BaseModelRecord().to_dict() == {
        "id": None, "revision": None, "resolved_path": None, "fingerprint": None, "quantization": None
    }  # fmt: skip


# --- recipe.yaml, through RunRecord ----------------------------------------------------------------------


def run_with_recipe(folder: Path, recipe: Any) -> RunRecord:
    from conftest import LORATOOL_RUN

    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({**LORATOOL_RUN, "status": "complete"}))
    if recipe is not None:
        (folder / "recipe.yaml").write_text(recipe if isinstance(recipe, str) else json.dumps(recipe))
    record = read_run(folder)
    assert record is not None
    return record


def test_the_run_recipe_is_validated_and_the_written_one_kept(tmp_path):
    from conftest import smoke_recipe
    from loratool.recipe import Recipe

    raw = smoke_recipe("org/model", "train.jsonl", tmp_path / "run")
    record = run_with_recipe(tmp_path / "run", raw)
    notes: list[str] = []
    recipe = record.recipe(notes.append)
    assert isinstance(recipe, Recipe) and recipe.lora.r == 8 and notes == []
    assert record.recipe_dict() == raw  # exactly what was written, for key-by-key comparisons
    assert read_training_run(record.path).recipe == recipe


def test_a_recipe_that_no_longer_validates_is_none_with_a_note(tmp_path):
    from conftest import smoke_recipe

    raw = smoke_recipe("org/model", "train.jsonl", tmp_path / "run", lora={"r": 8, "renamed_since": 1})
    record = run_with_recipe(tmp_path / "run", raw)
    notes: list[str] = []
    assert record.recipe(notes.append) is None
    assert len(notes) == 1 and notes[0].startswith("note: the run's recipe.yaml no longer validates (")
    assert record.recipe_dict() == raw
    with pytest.raises(Exception, match="renamed_since"):
        record.load_recipe()


@pytest.mark.parametrize("recipe", [None, "[not: a mapping", "- a\n- list\n"])
def test_a_missing_or_unreadable_recipe_is_none_without_a_note(tmp_path, recipe):
    record = run_with_recipe(tmp_path / "run", recipe)
    notes: list[str] = []
    assert record.recipe(notes.append) is None and record.recipe_dict() is None and notes == []
