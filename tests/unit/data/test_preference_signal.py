"""Preference pairs as training and the data view see them: pairs without signal (the rejected answer empty,
or the same tokens as the chosen one) are counted, warned about and refused when no pair has any; the
pair summary says what each number counts; the data view shows prompt, chosen and rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratool.data.build import build_datasets
from loratool.data.inspect import InspectedPair, format_report, inspect_data, to_html
from loratool.data.preference import build_preference_datasets
from loratool.errors import LoratoolError
from loratool.model.load import load_tokenizer
from loratool.recipe import DataSection, ModelSection, validate_recipe

WORDS = ["apple", "river", "candle", "garden", "violin", "mountain"]


def chat_pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def good(word: str) -> dict:
    return chat_pair(f"Tell me about {word}.", f"{word} is nice.", f"{word} is bad, go away.")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def section(path: Path, **settings) -> DataSection:
    return DataSection(train=[{"path": str(path), "format": "preference"}], **settings)


@pytest.fixture()
def tokenizer(tiny_llama):
    # A fresh one per test: building the data sets the chat template on it.
    return load_tokenizer(str(tiny_llama), ModelSection(), lambda _: None)


def test_pairs_without_signal_are_counted_and_warned_about_with_a_location(tmp_path, tokenizer):
    rows = [good(w) for w in WORDS[:4]]
    rows.append(chat_pair("Same?", "the same answer", "the same answer"))  # line 5
    rows.append(chat_pair("Empty?", "an answer", ""))  # line 6: an empty rejected answer
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = build_preference_datasets(section(path), tokenizer, seed=0)
    source = data.summary.train.sources[0]
    assert (source.used, source.without_signal) == (6, 2)  # kept (harmless), but counted
    assert source.to_dict()["pairs_without_signal"] == 2
    text = data.summary.format()
    assert "2 without signal" in text
    warning = next(line for line in text.splitlines() if "carry no preference signal" in line)
    assert "train: 2 of 6 pairs carry no preference signal" in warning
    assert (
        f"e.g. {path}:5: chosen and rejected are the same answer" in warning
        or f"e.g. {path}:6: the rejected answer is empty" in warning
    )


def test_supervised_summaries_have_no_pair_counts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": f"q {w}", "output": w} for w in WORDS])
    summary = build_datasets(DataSection(train=[{"path": str(path)}]), tokenizer, seed=0).summary
    assert summary.train.sources[0].without_signal is None
    assert "pairs_without_signal" not in summary.train.sources[0].to_dict()
    assert "without signal" not in summary.format()
    assert "per row on average, longest" in summary.format()


def test_training_pairs_that_all_lack_signal_are_refused_naming_the_file(tmp_path, tokenizer):
    rows = [chat_pair(f"Q {w}?", f"{w}.", f"{w}.") for w in WORDS[:3]] + [chat_pair("Q?", "a", "")]
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    with pytest.raises(LoratoolError) as info:
        build_preference_datasets(section(path), tokenizer, seed=0)
    message, hint = info.value.message, info.value.hint
    assert message.startswith("data.train: no preference pair carries signal: in all 4 training pairs of ")
    assert str(path) in message and f"e.g. {path}:" in message
    assert "columns:" in hint and "data.max_length" in hint


def test_answers_that_differ_only_past_max_length_carry_no_signal(tmp_path, tokenizer):
    shared = "one two three four five six seven eight nine ten"
    rows = [chat_pair(f"Count, {w}.", f"{shared} yes", f"{shared} no") for w in WORDS[:3]]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    whole = build_preference_datasets(section(path, max_length=512), tokenizer, seed=0)
    assert whole.summary.train.sources[0].without_signal == 0
    prompt = max(len(row["prompt_ids"]) for row in whole.train)
    with pytest.raises(LoratoolError) as info:  # only the shared words fit: the two answers are the same
        build_preference_datasets(section(path, max_length=prompt + 4), tokenizer, seed=0)
    assert "differ only after their first" in info.value.message and "data.max_length" in info.value.message


def test_the_pair_summary_says_what_each_number_counts(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "pairs.jsonl", [good(w) for w in WORDS])
    data = build_preference_datasets(section(path), tokenizer, seed=0)
    split = data.summary.train
    rows = list(data.train)
    tokens = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows)
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    assert (split.tokens, split.longest, split.kind) == (tokens, longest, "pairs")
    line = next(line for line in data.summary.format().splitlines() if line.strip().startswith("train:"))
    assert f"{tokens / len(rows):,.0f} per pair on average (prompt twice + chosen + rejected)" in line
    assert f"longest sequence (prompt + one answer) {longest:,} (max_length" in line
    assert "per row" not in line


def dpo_recipe(tmp_path: Path, model: Path, rows: list[dict], **data) -> object:
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return validate_recipe(
        {
            "base_model": str(model),
            "data": {"train": [{"path": str(path), "format": "preference"}], "max_length": 128, **data},
            "dpo": {},
            "training": {"output_dir": str(tmp_path / "out")},
        }
    )


def test_the_data_view_shows_pairs_as_training_encodes_them(tmp_path, tiny_llama, tokenizer):
    rows = [good(w) for w in WORDS] + [chat_pair("Same?", "the same answer", "the same answer")]
    recipe = dpo_recipe(tmp_path, tiny_llama, rows)
    report = inspect_data(recipe, tokenizer)
    assert all(isinstance(row, InspectedPair) for row in report.rows) and len(report.rows) == 7
    # The pairs shown are the pairs trained: the same prompt, chosen and rejected token ids.
    trained = build_preference_datasets(recipe.data, tokenizer, seed=0).train
    as_trained = {(tuple(r["prompt_ids"]), tuple(r["chosen_ids"]), tuple(r["rejected_ids"])) for r in trained}
    shown = {(tuple(p.prompt_ids), tuple(p.chosen_ids), tuple(p.rejected_ids)) for p in report.rows}
    assert shown == as_trained
    first = report.rows[0]
    assert [part.name for part in first.parts()] == ["prompt", "chosen", "rejected"]
    assert first.chosen.input_ids == first.prompt_ids + first.chosen_ids
    assert first.chosen.loss_tokens == len(first.chosen_ids)  # every answer token carries loss
    assert report.end_of_turn == "<|im_end|>"
    found = {f.check: f for f in report.findings}
    assert set(found) == {"pairs_without_signal"}
    assert found["pairs_without_signal"].examples == [
        f"{tmp_path / 'pairs.jsonl'}:7: chosen and rejected are the same answer"
    ]
    text = format_report(report, rows=1, color=False)
    assert "prompt: <|begin_of_text|><|im_start|>user\nTell me about apple." in text
    assert "chosen: [[apple is nice.<|im_end|>" in text
    assert "rejected: [[apple is bad, go away.<|im_end|>" in text
    assert "lengths (tokens per pair, prompt + its longer answer, before max_length=128)" in text
    assert "per pair on average" in text
    page = to_html(report, rows=2)
    assert page.count("class='row'") == 2 and page.count("<span class='part'>rejected</span>") == 2


def test_the_data_view_marks_what_max_length_cuts_from_both_answers(tmp_path, tiny_llama, tokenizer):
    long_answer = "a long answer with many many words in it " * 3
    rows = [chat_pair(f"Q {w}?", f"{w} {long_answer}", f"{w} no") for w in WORDS[:3]]
    recipe = dpo_recipe(tmp_path, tiny_llama, rows, max_length=32)
    report = inspect_data(recipe, tokenizer)
    cut = {f.check: f for f in report.findings}["truncated"]
    assert cut.count == 3 and "rows are longer than max_length=32" in cut.message
    text = format_report(report, rows=1, color=False)
    assert "cut at max_length 32" in text and "✂" in text.split("chosen: ")[1].split("rejected: ")[0]
