"""run.json is written through RunRecord: what train builds is exactly what every reader gets back."""

from __future__ import annotations

import json

from loratool.rundir.outputs import MARKER
from loratool.rundir.records import BaseModelRecord, RunDir, RunRecord, read_run

FULL = RunRecord(
    path=None,  # type: ignore[arg-type]  # set per test
    status="complete",
    error=None,
    base_model=BaseModelRecord(id="org/base", revision="main", resolved_path="/m", fingerprint="xxh3-128:ab"),
    data={"train": {"rows": 3}},
    train={"global_step": 4, "train_loss": 1.5},
    world_size=2,
    effective_batch_size=16,
    tokenizer_sha256="cd",
    resumes=[{"from_checkpoint": "checkpoint-2", "step": 2}],
    peak_memory_bytes={"process_rss": 10},
    wall_time_s=3.5,
    adapter_init={"method": "pissa"},
    loratool_version="0.1.0",
    versions={"torch": "2.13.0"},
    python="3.11.7",
    command=["loratool", "train", "r.yaml"],
    started_at="2026-12-06T10:00:00+0000",
    finished_at="2026-12-06T10:01:00+0000",
    hardware={"device": "cpu"},
    stage="dpo",
    dpo={"beta": 0.1},
    smoke={"of_base_model": "org/base"},
    adalora={"final_ranks": {}},
)


def test_every_field_written_is_read_back(tmp_path):
    run = RunDir(tmp_path)
    record = FULL.__class__(**{**FULL.__dict__, "path": tmp_path})
    run.start({"base_model": "org/base"}, record)
    run.finish(lambda folder: None, record)
    back = read_run(tmp_path)
    assert back is not None
    for name in record.__dataclass_fields__:
        if name in ("raw", "files"):
            continue
        assert getattr(back, name) == getattr(record, name), name
    written = json.loads((tmp_path / "run.json").read_text())
    assert written[MARKER]["kind"] == "run"
    assert set(back.files) == set(written["files"]) >= {"run.json", "recipe.yaml"}


def test_sections_a_run_does_not_have_are_left_out(tmp_path):
    plain = RunRecord(path=tmp_path, status="running", stage="sft")
    keys = set(plain.to_dict())
    assert not keys & {"dpo", "smoke", "adapter_init", "resumes", "train", "adalora", "error", "finished_at"}
    assert {"status", "stage", "base_model", "data"} <= keys


def test_a_failed_run_records_the_cause(tmp_path):
    run = RunDir(tmp_path)
    record = RunRecord(path=tmp_path, status="running", stage="sft")
    run.start({}, record)
    run.fail(record, ValueError("bad row"))
    back = read_run(tmp_path)
    assert back is not None and back.status == "failed" and back.error == "ValueError: bad row"
    assert (tmp_path / "traceback.txt").is_file() and "traceback.txt" in back.files
