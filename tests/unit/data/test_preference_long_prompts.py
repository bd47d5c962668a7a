"""Preference pairs whose prompt alone fills data.max_length: dropped by default (and counted under their
own reason), or, with data.prompt_truncation: keep_end, kept with the prompt cut from its start, as trl's
truncation_mode="keep_end" does; the summary says how many were dropped and how many prompts were cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratool.data.preference import build_preference_datasets, prompt_kept
from loratool.model.load import load_tokenizer
from loratool.recipe import DataSection, ModelSection

LONG = "Here is a long story about a river and a garden. " * 12


def pair(prompt: str, word: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": f"{word} is nice."}],
        "rejected": [{"role": "assistant", "content": f"{word} is bad, go away."}],
    }


@pytest.fixture()
def tokenizer(tiny_llama):
    return load_tokenizer(str(tiny_llama), ModelSection(), lambda _: None)


@pytest.fixture()
def pairs(tmp_path) -> Path:
    rows = [pair(f"Tell me about {w}.", w) for w in ("apple", "river", "candle")]
    rows += [pair(LONG + f"So, {w}?", w) for w in ("violin", "garden")]  # lines 4 and 5
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build(path: Path, tokenizer, **settings):
    settings = {"max_length": 64, **settings}
    data = DataSection(train=[{"path": str(path), "format": "preference"}], **settings)
    return build_preference_datasets(data, tokenizer, seed=0)


def test_a_long_prompt_drops_its_pair_by_default_and_says_why(pairs, tokenizer):
    data = build(pairs, tokenizer)
    source = data.summary.train.sources[0]
    assert (source.used, source.dropped["prompt_too_long"], source.dropped["no_loss"]) == (3, 2, 0)
    text = data.summary.format()
    assert "2 dropped (2 prompt too long)" in text
    assert f"{pairs}:4: the prompt alone is" in text
    assert "data.prompt_truncation: keep_end cuts it from its start instead" in text


def test_keep_end_cuts_the_prompt_from_its_start_and_keeps_the_answers(pairs, tokenizer):
    full = {tuple(r["chosen_ids"]): r["prompt_ids"] for r in build(pairs, tokenizer, max_length=4096).train}
    data = build(pairs, tokenizer, prompt_truncation="keep_end")
    source = data.summary.train.sources[0]
    assert (source.used, sum(source.dropped.values()), source.prompts_cut) == (5, 0, 2)
    assert source.to_dict()["pairs_with_prompt_cut"] == 2
    assert "2 truncated (2 from the prompt's start)" in data.summary.format()
    rows = list(data.train)
    assert all(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 64 for r in rows)
    assert {tuple(r["chosen_ids"]) for r in rows} == set(full)  # every answer whole
    # The prompt kept is the end of the full prompt: the question nearest the answers stays.
    for row in rows:
        assert full[tuple(row["chosen_ids"])][-len(row["prompt_ids"]) :] == row["prompt_ids"]


@pytest.mark.parametrize(
    ("prompt", "answer", "kept"),
    [
        (1500, 1000, 1048),  # the answer whole, the prompt's last tokens fill the rest
        (3000, 3000, 1024),  # a long answer still leaves half of max_length to the prompt
        (100, 3000, 100),  # a short prompt is never cut
    ],
)
def test_how_much_of_the_prompt_keep_end_keeps(prompt, answer, kept):
    assert prompt_kept(prompt, answer, 2048) == kept
