"""Reading rows with their locations: every file type, directories, max_rows, and the error messages."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers.data import source, write_json, write_jsonl
from loratool.data.sources import looks_like_hub_id, open_source, read_rows
from loratool.errors import LoratoolError


def rows_of(path: Path | str, **fields) -> list:
    return list(read_rows(source(path, **fields)))


def test_jsonl_rows_carry_one_based_line_numbers_and_bad_lines_become_bad_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("train.jsonl").write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c",}\n[1, 2]\n{"text": "d"}\n')
    rows = rows_of("train.jsonl")
    assert [r.location for r in rows] == [
        "train.jsonl:1",
        "train.jsonl:3",
        "train.jsonl:4",
        "train.jsonl:5",
        "train.jsonl:6",
    ]
    assert [r.data for r in rows if r.error is None] == [{"text": "a"}, {"text": "b"}, {"text": "d"}]
    bad = {r.location: r.error for r in rows if r.error}
    assert bad["train.jsonl:4"].startswith("invalid JSON: Expecting property name")
    assert "column" in bad["train.jsonl:4"]
    assert bad["train.jsonl:5"] == "expected a JSON object {...}, got a list"


def test_json_array_rows_are_located_by_index(tmp_path):
    path = write_json(tmp_path / "data.json", [{"text": "a"}, {"text": "b"}, "oops"])
    rows = rows_of(path)
    assert [r.location for r in rows] == [f"{path}[0]", f"{path}[1]", f"{path}[2]"]
    assert rows[1].data == {"text": "b"}
    assert rows[2].error == "expected a JSON object {...}, got a string"


def test_json_lines_saved_as_json_are_read_line_by_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    rows = rows_of(path)
    assert [r.location for r in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert rows[1].data == {"text": "b"} and rows[2].error.startswith("invalid JSON")


def test_json_object_holding_one_list_reads_that_list(tmp_path):
    path = write_json(tmp_path / "data.json", {"version": 2, "data": [{"text": "a"}, {"text": "b"}]})
    rows = rows_of(path)
    assert [(r.location, r.data) for r in rows] == [
        (f"{path}[data][0]", {"text": "a"}),
        (f"{path}[data][1]", {"text": "b"}),
    ]


def test_broken_json_array_is_a_file_error_with_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n]\n')
    with pytest.raises(LoratoolError) as err:
        rows_of(path)
    assert err.value.message.startswith(f"{path}:4: invalid JSON")
    assert "JSON Lines" in err.value.hint


def test_csv_rows_are_numbered_after_the_header(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\nSay hi,"Hi,\nthere"\nAdd,5\ntoo,many,cells\n', encoding="utf-8")
    rows = rows_of(path)
    assert [r.location for r in rows] == [f"{path}:row 1", f"{path}:row 2", f"{path}:row 3"]
    assert rows[0].data == {"instruction": "Say hi", "output": "Hi,\nthere"}
    assert rows[1].data == {"instruction": "Add", "output": "5"}
    assert rows[2].error == "the row has more cells than the header has columns"


def test_parquet_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"prompt": ["p1", "p2", "p3"], "completion": ["c1", "c2", None]}), path)
    rows = rows_of(path)
    assert [r.location for r in rows] == [f"{path}[row 1]", f"{path}[row 2]", f"{path}[row 3]"]
    assert rows[0].data == {"prompt": "p1", "completion": "c1"}
    assert rows[2].data == {"prompt": "p3", "completion": None}


def test_txt_blocks_separated_by_blank_lines_are_documents(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("First doc\nstill first\n\n\nSecond doc\n  \nThird\n")
    rows = rows_of(path)
    assert [(r.location, r.data) for r in rows] == [
        (f"{path}:1", {"text": "First doc\nstill first"}),
        (f"{path}:5", {"text": "Second doc"}),
        (f"{path}:7", {"text": "Third"}),
    ]


def test_directory_reads_supported_files_in_name_order(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": "b1"}, {"text": "b2"}])
    write_json(folder / "a.json", [{"text": "a1"}])
    (folder / "c.txt").write_text("c1\n")
    (folder / "README.md").write_text("not data")
    (folder / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    rows = rows_of(folder)
    assert [r.location for r in rows] == [
        f"{folder}/a.json[0]",
        f"{folder}/b.jsonl:1",
        f"{folder}/b.jsonl:2",
        f"{folder}/c.txt:1",
    ]
    assert [r.data["text"] for r in rows] == ["a1", "b1", "b2", "c1"]


def test_directory_without_data_files(tmp_path):
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(LoratoolError) as err:
        rows_of(tmp_path)
    assert "holds no .json, .jsonl, .csv, .parquet, .txt files" in err.value.message
    assert "README.md" in err.value.hint


def test_max_rows_takes_the_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": str(i)} for i in range(10)])
    rows = rows_of(path, max_rows=3)
    assert [r.data["text"] for r in rows] == ["0", "1", "2"]


def test_missing_file_names_the_resolved_path_and_what_is_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text("[]")
    with pytest.raises(LoratoolError) as err:
        rows_of("data/train.jsonl")
    assert err.value.message == f"data source not found: {tmp_path / 'data' / 'train.jsonl'}"
    assert "train.json" in err.value.hint


def test_missing_file_in_a_missing_directory(tmp_path):
    with pytest.raises(LoratoolError) as err:
        rows_of(tmp_path / "nope" / "train.jsonl")
    assert str(tmp_path / "nope" / "train.jsonl") in err.value.message
    assert "does not exist either" in err.value.hint


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<rows/>")
    with pytest.raises(LoratoolError) as err:
        rows_of(path)
    assert "unsupported file type '.xml'" in err.value.message
    assert ".jsonl" in err.value.hint and ".parquet" in err.value.hint


@pytest.mark.parametrize(
    ("path", "hub"),
    [
        ("tatsu-lab/alpaca", True),
        ("squad", True),
        ("org/name_v2.1-x", True),
        ("data/train.jsonl", False),
        ("./alpaca", False),
        ("/abs/path", False),
        ("train.json", False),
        ("a/b/c", False),
    ],
)
def test_what_looks_like_a_hub_id(path, hub):
    assert looks_like_hub_id(path) is hub


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Both libraries read the variables once, at import: make sure the imported copies agree.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(LoratoolError) as err:
        rows_of("someorg/some-dataset", split="train")
    assert time.monotonic() - started < 20
    assert err.value.message.startswith(
        "data source 'someorg/some-dataset' is not a local file or directory, and loading it from the hub "
        "failed: "
    )
    assert str(tmp_path / "someorg" / "some-dataset") in err.value.hint
    assert "local files" in err.value.hint


def test_fingerprint_is_the_sha256_of_the_bytes_and_changes_with_them(tmp_path):
    import hashlib

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}])
    _, first = open_source(source(path))
    assert first["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    write_jsonl(path, [{"text": "b"}])
    _, second = open_source(source(path))
    assert second["sha256"] != first["sha256"]


def test_directory_fingerprint_covers_every_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    _, first = open_source(source(tmp_path))
    write_jsonl(tmp_path / "b.jsonl", [{"text": "B"}])
    _, second = open_source(source(tmp_path))
    assert first["files"] == 2 and first["sha256"] != second["sha256"]


def test_hub_dataset_rows_are_located_by_split_and_index(monkeypatch, tmp_path):
    import datasets

    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["a", "b", "c"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows_iter, fp = open_source(source("org/name", subset="en", split="validation", max_rows=2))
    rows = list(rows_iter)
    assert calls == [("org/name", "en", "validation")]
    assert [(r.location, r.data) for r in rows] == [
        ("org/name[en][validation][0]", {"text": "a"}),
        ("org/name[en][validation][1]", {"text": "b"}),
    ]
    assert fp["hub"] == "org/name" and fp["subset"] == "en" and fp["split"] == "validation"
    assert fp["datasets_fingerprint"]


def test_empty_file_has_no_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert rows_of(path) == []
