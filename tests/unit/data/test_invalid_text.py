"""Text that no tokenizer can read — a lone UTF-16 surrogate ("\\ud800" in JSON) or bytes that are not
UTF-8 — is a bad row with its file and line, in every format that reads text: it fails the build with
that location, or is skipped and counted under data.on_bad_row: skip. Never an internal error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratool.data.build import build_datasets
from loratool.data.sources import read_rows
from loratool.errors import LoratoolError
from loratool.model.load import load_tokenizer
from loratool.recipe import DataSection, DataSource, ModelSection

GOOD = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(3)]
LONE = '{"instruction": "q", "output": "bad \\ud800 here"}'  # valid JSON, but half a character pair


def lines(*rows: dict | str) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def rows_of(path: Path) -> list:
    return list(read_rows(DataSource(path=str(path))))


def errors(path: Path) -> dict[str, str]:
    return {row.location: row.error for row in rows_of(path) if row.error}


@pytest.fixture()
def tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama), ModelSection(), lambda _: None)


def test_a_lone_surrogate_fails_the_build_with_file_and_line_or_is_skipped(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    path.write_text(lines(*GOOD[:2], LONE, GOOD[2]), encoding="utf-8")
    with pytest.raises(LoratoolError) as info:
        build_datasets(DataSection(train=[{"path": str(path)}]), tokenizer, seed=0)
    assert info.value.message.startswith(
        f"{path}:3: invalid text: a lone UTF-16 surrogate (\\ud800) in field 'output'"
    )
    assert "data.on_bad_row: skip" in info.value.hint
    data = build_datasets(DataSection(train=[{"path": str(path)}], on_bad_row="skip"), tokenizer, seed=0)
    source = data.summary.train.sources[0]
    assert (source.read, source.used, source.dropped["malformed"]) == (4, 3, 1)
    assert source.bad_rows[0]["location"] == f"{path}:3"


def test_lone_surrogates_are_found_in_nested_fields_and_in_json_documents(tmp_path):
    path = tmp_path / "chat.jsonl"
    nested = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\udfff"}]}'
    pair = '{"messages": [{"role": "user", "content": "an emoji: \\ud83d\\ude00"}]}'  # a full pair: fine
    path.write_text(lines(nested, pair), encoding="utf-8")
    assert errors(path) == {
        f"{path}:1": "invalid text: a lone UTF-16 surrogate (\\udfff) in field 'messages[1].content', which "
        "cannot be written as UTF-8 (no tokenizer can read it)"
    }
    array = tmp_path / "data.json"
    array.write_text('[{"text": "ok"}, {"text": "\\ud800"}]', encoding="utf-8")
    assert list(errors(array)) == [f"{array}[1]"]
    as_json_lines = tmp_path / "lines.json"
    as_json_lines.write_text(lines({"text": "ok"}, '{"text": "\\udc00"}'), encoding="utf-8")
    assert list(errors(as_json_lines)) == [f"{as_json_lines}:2"]


def test_bytes_that_are_not_utf8_are_a_bad_row_in_line_and_record_formats(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n{"text": "ok"}\n')
    assert errors(jsonl) == {
        f"{jsonl}:2": "invalid text: not UTF-8 (byte 0xe9 at column 14: invalid continuation byte)"
    }
    table = tmp_path / "train.csv"
    table.write_bytes(b"instruction,output\nok,fine\ncaf\xe9,x\n")
    assert errors(table) == {f"{table}:row 2": "invalid text: not UTF-8 (byte 0xe9 in field 'instruction')"}
    document = tmp_path / "train.json"
    document.write_bytes(b'[\n {"text": "ok"},\n {"text": "caf\xe9"}\n]\n')
    with pytest.raises(LoratoolError) as info:  # one JSON document: nothing can be read until it is fixed
        rows_of(document)
    assert info.value.message.startswith(f"{document}:3: not UTF-8 text (byte 0xe9")


def test_parquet_strings_that_are_not_utf8_are_a_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.array([b"ok", b"bad \xed\xa0\x80 bytes", b"fine"], type=pa.binary())
    strings = pa.Array.from_buffers(pa.string(), len(raw), raw.buffers())  # unchecked, as other tools write
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": strings}), path)
    rows = rows_of(path)
    assert [row.data for row in rows] == [{"text": "ok"}, None, {"text": "fine"}]
    assert rows[1].location == f"{path}[row 2]" and rows[1].error.startswith(
        "invalid text: not UTF-8 (byte 0xed"
    )


def test_a_line_separator_inside_a_json_string_does_not_split_the_row(tmp_path):
    path = tmp_path / "train.jsonl"
    text = "first\u2028second\u0085third"  # characters str.splitlines would cut a line at
    path.write_text(
        json.dumps({"text": text}, ensure_ascii=False) + "\n" + '{"text": "next"}\n', encoding="utf-8"
    )
    assert [(row.location, row.data) for row in rows_of(path)] == [
        (f"{path}:1", {"text": text}),
        (f"{path}:2", {"text": "next"}),
    ]
