"""build_datasets end to end: bad rows, truncation, validation split, summary numbers."""

from __future__ import annotations

import json
import time

import pytest

from helpers.data import ALPACA_ROWS, IGNORE, chatml_tokenizer, loss_ids, source, write_json, write_jsonl
from helpers.data_build import assert_rows_accounted_for, build

# a fixture, imported for pytest to find in this module
from helpers.data_build import tok as tok
from loratool.errors import LoratoolError


def test_alpaca_build_returns_datasets_with_ids_and_labels(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    data = build(tok, path)
    assert data.train.column_names == ["input_ids", "labels"]
    assert data.train.num_rows == 3 and data.validation is None
    answers = sorted(tok.decode(loss_ids(r["input_ids"], r["labels"])) for r in data.train)
    assert answers == sorted(row["output"] + "<|im_end|>\n" for row in ALPACA_ROWS)
    summary = data.summary
    assert summary.train.sources[0].format == "alpaca"
    assert summary.chat_template == "the tokenizer's own" and summary.chat_template_sha256
    json.dumps(summary.to_dict())  # goes into run.json


def test_summary_numbers_equal_a_hand_count(tok, tmp_path):
    texts = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Fine-tuning adapts a model."]
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in texts])
    summary = build(tok, path).summary
    # Each row: BOS + text + EOS; everything but the BOS (position 0) is learned.
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in texts)
    loss = tokens - len(texts)
    assert (summary.train.rows, summary.train.tokens, summary.train.loss_tokens) == (3, tokens, loss)
    assert summary.train.loss_fraction == round(loss / tokens, 4)
    info = summary.to_dict()["train"]["sources"][0]
    assert info["tokens"] == tokens and info["loss_tokens"] == loss and info["rows_read"] == 3
    assert summary.chat_template is None  # raw text needs no template
    text = summary.format()
    assert f"{tokens:,} tokens" in text and f"loss on {100 * loss / tokens:.1f}%" in text


def test_bad_json_line_fails_with_file_and_line(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n{"text": "ok"}\n')
    with pytest.raises(LoratoolError) as err:
        build(tok, path)
    assert err.value.message.startswith(f"{path}:2: invalid JSON: Expecting ',' delimiter")
    assert "data.on_bad_row: skip" in err.value.hint


def test_bad_rows_are_skipped_counted_and_shown(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [
        json.dumps(
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
        ),
        '{"messages": [',
        json.dumps({"messages": []}),
        json.dumps({"messages": [{"role": "user", "content": 7}]}),
        json.dumps({"messages": [{"role": "robot", "content": "beep"}]}),
        json.dumps({"dialog": []}),
    ]
    path.write_text("\n".join(rows) + "\n")
    data = build(tok, path, on_bad_row="skip")
    s = data.summary.train.sources[0]
    assert (s.read, s.used, s.dropped["malformed"]) == (6, 1, 5)
    reasons = {row["location"]: row["reason"] for row in s.bad_rows}
    assert reasons[f"{path}:2"].startswith("invalid JSON")
    assert reasons[f"{path}:3"] == "empty conversation: field 'messages' is an empty list (format messages)"
    assert reasons[f"{path}:4"] == "messages[0].content must be a string, got a number (format messages)"
    assert reasons[f"{path}:5"].startswith("messages[0]: unknown role 'robot' — add it under roles:")
    assert len(s.bad_rows) == 5
    assert_rows_accounted_for(data.summary)
    text = data.summary.format()
    assert "5 dropped (5 malformed)" in text
    assert "rows left out (first 5 of 5)" not in text and "rows left out (5 of 5)" in text
    assert f"{path}:2: invalid JSON" in text


def test_missing_field_fails_with_location_and_format(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA_ROWS[0], {"instruction": "No answer"}])
    with pytest.raises(LoratoolError) as err:
        build(tok, source(path, format="alpaca"))
    assert err.value.message == f"{path}:2: field 'output' is missing (format alpaca)"


def test_wrong_type_fails_in_fail_mode(tok, tmp_path):
    path = write_json(tmp_path / "train.json", [{"instruction": "Count", "output": 3}])
    with pytest.raises(LoratoolError) as err:
        build(tok, path)
    assert err.value.message == f"{path}[0]: field 'output' must be a string, got a number (format alpaca)"


def test_empty_outputs_are_dropped_not_fatal(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "train.jsonl", [*ALPACA_ROWS, {"instruction": "Say nothing.", "output": ""}]
    )
    data = build(tok, path)
    s = data.summary.train.sources[0]
    assert (s.used, s.dropped["empty"]) == (3, 1)
    assert s.bad_rows == [{"location": f"{path}:4", "reason": "field 'output' is empty"}]


def test_truncate_caps_length_and_counts(tok, tmp_path):
    rows = [
        {"text": "short"},
        {"text": "a much longer text that certainly needs more than sixteen tokens " * 3},
    ]
    data = build(tok, write_jsonl(tmp_path / "t.jsonl", rows), max_length=16)
    assert max(len(ids) for ids in data.train["input_ids"]) == 16
    s = data.summary.train.sources[0]
    assert (s.used, s.truncated, sum(s.dropped.values())) == (2, 1, 0)
    assert data.summary.train.longest == 16


def test_drop_removes_long_rows(tok, tmp_path):
    rows = [
        {"text": "short"},
        {"text": "a much longer text that certainly needs more than sixteen tokens " * 3},
    ]
    data = build(tok, write_jsonl(tmp_path / "t.jsonl", rows), max_length=16, truncation="drop")
    s = data.summary.train.sources[0]
    assert (s.used, s.truncated, s.dropped["too_long"]) == (1, 0, 1)
    assert "1 dropped (1 too long)" in data.summary.format()


def test_row_whose_loss_lies_beyond_max_length_is_dropped_as_no_loss(tok, tmp_path):
    long_prompt = {"instruction": "Please read this carefully. " * 20, "output": "Yes."}
    data = build(tok, write_jsonl(tmp_path / "t.jsonl", [ALPACA_ROWS[0], long_prompt]), max_length=32)
    s = data.summary.train.sources[0]
    assert (s.used, s.dropped["no_loss"], s.truncated) == (1, 1, 0)
    assert all(set(labels) != {IGNORE} for labels in data.train["labels"])


def test_conversation_without_assistant_turn_is_dropped_as_no_loss(tok, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    ]
    data = build(tok, write_jsonl(tmp_path / "t.jsonl", rows))
    assert data.summary.train.sources[0].dropped["no_loss"] == 1 and data.train.num_rows == 1


def test_everything_dropped_says_why(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"text": "one two three four five six seven eight nine ten"}] * 12
    )
    with pytest.raises(LoratoolError) as err:
        build(tok, path, max_length=4, truncation="drop")
    assert (
        "data.train: no usable rows: all 12 rows were longer than data.max_length=4 tokens"
        in err.value.message
    )
    assert err.value.hint == "raise data.max_length or set data.truncation: truncate"


def test_everything_malformed_when_skipping(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("{bad\n{worse\n")
    with pytest.raises(LoratoolError) as err:
        build(tok, path, on_bad_row="skip")
    assert "all 2 rows were malformed" in err.value.message and f"{path}:1" in err.value.message


def test_validation_fraction_is_seeded_disjoint_and_counted(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"document number {i}"} for i in range(20)])

    def split(seed):
        data = build(tok, path, validation=0.25, seed=seed)
        return (
            data,
            [tuple(ids) for ids in data.train["input_ids"]],
            [tuple(ids) for ids in data.validation["input_ids"]],
        )

    data, train, val = split(seed=1)
    assert len(val) == 5 and len(train) == 15
    assert not set(train) & set(val)
    assert split(seed=1)[1:] == (train, val)  # same seed, same split and order
    assert set(split(seed=2)[2]) != set(val)
    s = data.summary.train.sources[0]
    assert (s.read, s.used, s.held_out) == (20, 15, 5)
    assert data.summary.validation.rows == 5 and data.summary.validation.origin == "25% of train, seed 1"
    assert_rows_accounted_for(data.summary)
    assert "validation 5 rows (25% of train, seed 1)" in data.summary.format()


def test_validation_fraction_keeps_one_row_on_each_side(tok, tmp_path):
    two = write_jsonl(tmp_path / "two.jsonl", [{"text": "a"}, {"text": "b"}])
    data = build(tok, two, validation=0.01)
    assert (data.train.num_rows, data.validation.num_rows) == (1, 1)
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    with pytest.raises(LoratoolError) as err:
        build(tok, one, validation=0.5)
    assert "leaves none to train on" in err.value.message


def test_validation_sources_are_built_the_same_way(tok, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    val = write_jsonl(tmp_path / "val.jsonl", [{"text": "held out"}, {"text": "x" * 400}])
    data = build(tok, train, validation=[source(val)], max_length=64, truncation="drop")
    assert data.validation.num_rows == 1
    assert data.summary.validation.sources[0].dropped["too_long"] == 1
    text = data.summary.format()
    assert "  train:" in text and "  validation:" in text


def test_sources_are_mixed_with_the_seed(tok, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    first = build(tok, a, b, seed=3).train["input_ids"]
    assert build(tok, a, b, seed=3).train["input_ids"] == first
    decoded = [tok.decode(ids[1:-1]) for ids in first]
    assert sorted(decoded) == sorted([f"a{i}" for i in range(10)] + [f"b{i}" for i in range(10)])
    assert decoded[:10] != [f"a{i}" for i in range(10)]


def test_fingerprint_changes_when_the_file_changes(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ALPACA_ROWS)
    before = build(tok, path).summary.to_dict()["train"]["sources"][0]["fingerprint"]
    write_jsonl(path, ALPACA_ROWS[:2])
    after = build(tok, path).summary.to_dict()["train"]["sources"][0]["fingerprint"]
    assert before["sha256"] != after["sha256"] and before["path"] == str(path)


def test_chat_template_is_required_only_for_conversations(tmp_path):
    bare = chatml_tokenizer(chat_template=False)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    assert build(bare, text).train.num_rows == 1 and bare.chat_template is None
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_ROWS)
    with pytest.raises(LoratoolError) as err:
        build(bare, alpaca)
    assert "has no chat template" in err.value.message
    data = build(bare, alpaca, chat_template="llama3")
    assert "<|start_header_id|>" in bare.chat_template
    assert data.summary.chat_template == "llama3 (built-in)"
    assert any("<|eot_id|>" in w for w in data.summary.warnings)  # not a token of the tiny vocabulary


def test_template_problem_names_the_source(tok, tmp_path):
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}X{% else %}"
        "{{ m['content'] }}{% endif %}{% endfor %}"
    )
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2}]
    with pytest.raises(LoratoolError) as err:
        build(tok, write_jsonl(tmp_path / "t.jsonl", rows))
    assert err.value.message.startswith(
        f"data source {tmp_path / 't.jsonl'}: the chat template is not prefix-stable"
    )


def test_format_lists_sources_with_counts(tok, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        "\n".join(
            [
                *(json.dumps(r) for r in ALPACA_ROWS),
                "{oops",
                json.dumps({"instruction": "x" * 300, "output": "y"}),
            ]
        )
    )
    data = build(tok, path, on_bad_row="skip", max_length=48, truncation="drop")
    text = data.summary.format()
    assert text.splitlines()[0].startswith("data: train 3 rows (1 source)")
    assert "5 read   3 used   0 truncated   2 dropped (1 malformed, 1 too long)" in text


def test_two_thousand_alpaca_rows_take_seconds(tok, tmp_path):
    rows = [
        {
            "instruction": f"Explain item {i} in one sentence.",
            "input": "Some context " * 5,
            "output": f"Item {i} is fine." * 3,
        }
        for i in range(2000)
    ]
    path = write_json(tmp_path / "big.json", rows)
    build(tok, write_jsonl(tmp_path / "warm.jsonl", ALPACA_ROWS))  # imports datasets once
    started = time.perf_counter()
    data = build(tok, path)
    elapsed = time.perf_counter() - started
    assert data.train.num_rows == 2000
    assert elapsed < 10, f"{elapsed:.1f}s for 2,000 rows"  # ~1 s on 2 idle cores; generous for busy CI


def test_empty_source_says_so(tok, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(LoratoolError) as err:
        build(tok, path)
    assert err.value.message == f"data.train: the sources hold no rows ({path})"


def test_summary_shows_the_first_five_left_out_rows(tok, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "good"}\n' + "{bad\n" * 8)
    text = build(tok, path, on_bad_row="skip").summary.format()
    assert "rows left out (first 5 of 8):" in text
    assert f"{path}:6: invalid JSON" in text and f"{path}:7:" not in text
