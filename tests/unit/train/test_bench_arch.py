"""scripts/bench_arch.py's guard (`make bench-quick`): it reads the recorded table of docs/benchmarks.md and
flags a ratio that fell by more than the recorded spread. Nothing is trained here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[3] / "scripts"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPTS))  # bench_arch imports its sibling bench_train
    try:
        spec = importlib.util.spec_from_file_location("bench_arch", SCRIPTS / "bench_arch.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


DOC = """# Benchmarks

## Per-architecture training throughput — `scripts/bench_arch.py`

| model | side | against | real tokens/s | peak RSS | steps x rounds | date |
|---|---|---|---|---|---|---|
| qwen3 | default | baseline | 2.71 [2.55-2.75]x | 0.78 [0.77-0.82]x | 10 x 3 | 2026-12-01 |
| gemma3_text | without_cpu_vocab_tiles | default | 1.05x | 1.40x | 10 x 1 | 2026-12-01 |

## Merge memory and time

| model | side | against | real tokens/s | peak RSS | steps x rounds | date |
|---|---|---|---|---|---|---|
| qwen3 | not | this table | 9.99x | 9.99x | 1 x 1 | - |
"""


def run(ratio: float, rss: float, side: str = "default", against: str = "baseline") -> dict:
    return {"side": side, "against": against, "tokens_per_s": [ratio], "peak_rss": [rss], "step_cpu": [1.0]}


def test_the_table_under_its_heading_is_read_and_no_other(bench, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC)
    table = bench.recorded_table(doc)
    assert table == {
        ("qwen3", "default", "baseline"): {
            "tokens_per_s": (2.71, 2.55, 2.75),
            "peak_rss": (0.78, 0.77, 0.82),
        },
        ("gemma3_text", "without_cpu_vocab_tiles", "default"): {
            "tokens_per_s": (1.05, 1.05, 1.05),
            "peak_rss": (1.40, 1.40, 1.40),
        },
    }


def test_a_ratio_is_flagged_only_when_it_moved_the_wrong_way_by_more_than_the_spread(bench, tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC)
    table = bench.recorded_table(doc)
    # spread 0.20 (2.55-2.75): 2.60 is within it, 2.40 is not; faster or lighter is never flagged
    assert bench.compare("qwen3", [run(2.60, 0.80)], table) == []
    assert bench.compare("qwen3", [run(3.50, 0.50)], table) == []
    assert bench.compare("qwen3", [run(2.40, 0.80)], table) == ["qwen3 default / baseline tokens per s"]
    assert bench.compare("qwen3", [run(2.71, 0.90)], table) == ["qwen3 default / baseline peak rss"]
    # a single recorded value: 10% of it
    ablation = dict(side="without_cpu_vocab_tiles", against="default")
    assert bench.compare("gemma3_text", [run(1.00, 1.40, **ablation)], table) == []
    assert bench.compare("gemma3_text", [run(0.90, 1.40, **ablation)], table) == [
        "gemma3_text without_cpu_vocab_tiles / default tokens per s"
    ]
    # nothing recorded yet: printed, never flagged
    assert bench.compare("phi3", [run(0.10, 9.0)], table) == []


def test_every_side_is_against_the_side_that_differs_from_it_in_one_thing(bench):
    assert bench.against("baseline") is None
    assert bench.against("default") == "baseline"
    assert bench.against("baseline_no_checkpointing") == "baseline"
    assert bench.against("no_checkpointing") == "baseline_no_checkpointing"
    assert bench.against("without_loss_positions") == "default"


def test_the_real_doc_has_the_table(bench):
    assert bench.recorded_table() is not None
    assert bench.TABLE_HEADING in bench.BENCHMARKS_DOC.read_text()
