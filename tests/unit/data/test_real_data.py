"""The data formats on the real files in ../shared/data (alpaca, ShareGPT with tool calls, dolly
/ c4 text).

Every row is accounted for (an example, or a rejection naming its file and row with the reason), loss masks
cover exactly the assistant turns (plus their end-of-turn marker) and nothing of the prompts, and a short
training run on a real file lowers the held-out loss. The expected counts below are what these files hold,
each explained where it is not "all rows used".

The tokenizer is the tiny models' 512-token byte-level BPE (a real trained tokenizer, ~1 token per 1.5
characters on English) with loratool's built-in ChatML template (tools preamble, <tool_call> syntax).
The first tests (no shared data needed) pin the pipeline fixes these files called for.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_data_formats import GLAIVE_ROW

from helpers.data import IGNORE, chatml_tokenizer, loss_ids, section, source, template_ids, write_jsonl
from helpers.real_data import REAL_FILES

# a fixture, imported for pytest to find in this module
from helpers.real_data import shared as shared
from loratool.data import build_datasets
from loratool.data.formats import Conversation, to_example
from loratool.data.sources import read_rows
from loratool.data.templates import apply_chat_template_choice, renders_tool_calls
from loratool.data.tokenize import encode

MAX_LENGTH = 4096  # tokens; long enough for all but a handful of rows with this small vocabulary
END = "<|im_end|>"

CALL_JSON = '{"name": "search_recipes", "arguments": {"q": "chicken"}}'


def builtin_chatml() -> Any:
    tokenizer = chatml_tokenizer()
    apply_chat_template_choice(tokenizer, "chatml")
    return tokenizer


def loss_text(tokenizer: Any, ids: list[int], labels: list[int]) -> str:
    return tokenizer.decode(loss_ids(ids, labels))


# --- the pipeline fixes (synthetic rows shaped like the real ones; always run) ----------------------------


def test_function_call_turns_are_written_in_the_templates_tool_call_syntax():
    tokenizer = builtin_chatml()
    example = to_example(GLAIVE_ROW, "sharegpt", source("x.json"))
    ids, labels = encode(example, tokenizer, completion_only_loss=True)
    # The call and the answer are learned, in ChatML's <tool_call> form that its tools preamble asks for;
    # the tool's result (an observation) and the prompt are not.
    assert (
        loss_text(tokenizer, ids, labels)
        == f"<tool_call>{CALL_JSON}</tool_call>{END}\nTry the stir fry.{END}\n"
    )
    text = tokenizer.decode(ids)
    assert '<tools>\n{"name": "search_recipes"' in text and '<|im_start|>tool\n{"recipes"' in text


def test_templates_that_ignore_tool_calls_get_the_call_back_as_text():
    tokenizer = chatml_tokenizer()  # the tiny models' own ChatML: prints content only
    assert not renders_tool_calls(tokenizer) and renders_tool_calls(builtin_chatml())
    example = to_example(GLAIVE_ROW, "sharegpt", source("x.json"))
    ids, labels = encode(example, tokenizer, completion_only_loss=True)
    assert loss_text(tokenizer, ids, labels) == f"{CALL_JSON}{END}\nTry the stir fry.{END}\n"
    # An OpenAI-style tool-call message (content null) no longer renders as an empty, learned turn either.
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    ids, labels = encode(Conversation(messages), tokenizer, completion_only_loss=True)
    assert loss_text(tokenizer, ids, labels) == '{"name": "f", "arguments": {"x": 1}}' + END + "\n"


def test_a_template_that_drops_tool_definitions_is_warned_about(tmp_path):
    path = write_jsonl(tmp_path / "glaive.jsonl", [GLAIVE_ROW, GLAIVE_ROW])
    own = build_datasets(section(source(path, format="sharegpt")), chatml_tokenizer(), seed=0).summary
    (warning,) = own.warnings
    assert warning.startswith("2 rows define tools, but the chat template does not write tool definitions")
    assert "warning: 2 rows define tools" in own.format()
    builtin = section(source(path, format="sharegpt"), chat_template="chatml")
    assert build_datasets(builtin, chatml_tokenizer(), seed=0).summary.warnings == []


@pytest.mark.parametrize(
    ("value", "calls"),
    [
        ('[{"name": "a", "arguments": {}}, {"name": "b"}]', [("a", {}), ("b", {})]),  # parallel calls
        ("I will call the search function now.", None),  # not JSON: stays text
        ('{"arguments": {}}', None),  # no function name: stays text
    ],
)
def test_function_call_values_that_are_not_a_single_call(value, calls):
    row = {"conversations": [{"from": "human", "value": "Q"}, {"from": "function_call", "value": value}]}
    message = to_example(row, "sharegpt", source("x.json")).messages[1]
    if calls is None:
        assert message == {"role": "assistant", "content": value}
    else:
        got = [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
        assert got == calls and message["content"] == ""


def test_rows_dropped_for_length_or_no_loss_are_named(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"instruction": "Hi", "output": "Hello"},
            {"instruction": "Read this carefully. " * 30, "output": "Done."},  # answer beyond max_length
        ],
    )
    data = build_datasets(section(source(path), max_length=48), chatml_tokenizer(), seed=0)
    (bad,) = data.summary.train.sources[0].bad_rows
    assert bad["location"] == f"{path}:2" and bad["reason"].startswith(
        "no token to learn from in the first 48"
    )
    data = build_datasets(section(source(path), max_length=48, truncation="drop"), chatml_tokenizer(), seed=0)
    (bad,) = data.summary.train.sources[0].bad_rows
    assert bad["location"] == f"{path}:2" and bad["reason"].endswith("tokens, over data.max_length=48")
    assert f"{path}:2: " in data.summary.format()


@pytest.mark.parametrize("name", REAL_FILES)
def test_every_real_row_is_an_example_or_a_rejection_naming_its_row(name, shared):
    relative, fmt, rows, dropped, truncated = REAL_FILES[name]
    path = shared / relative
    data = build_datasets(
        section(source(path, format=fmt), chat_template="chatml", max_length=MAX_LENGTH, on_bad_row="skip"),
        chatml_tokenizer(),
        seed=0,
    )
    (summary,) = data.summary.train.sources
    assert (summary.format, summary.read) == (fmt, rows)
    assert summary.read == summary.used + sum(summary.dropped.values())
    assert {reason: n for reason, n in summary.dropped.items() if n} == {
        r: len(i) for r, i in dropped.items()
    }
    assert summary.truncated == truncated and data.train.num_rows == summary.used
    expected = [f"{path}[{index}]" for indices in dropped.values() for index in indices]
    assert [row["location"] for row in summary.bad_rows] == expected
    assert all(row["reason"] for row in summary.bad_rows)
    assert all(any(label != IGNORE for label in labels) for labels in data.train["labels"])


def expected_loss_text(row: dict[str, Any], fmt: str) -> str:
    """What carries loss, computed from the raw row (not from the pipeline): each assistant turn as the
    built-in ChatML template writes it, with its end-of-turn marker; for raw text, all of it plus EOS."""
    if fmt == "alpaca":
        return row["output"] + END + "\n"
    if fmt == "text":
        return row["text"] + END
    parts = []
    for turn in row["conversations"]:
        if turn["from"] == "gpt":
            parts.append(turn["value"] + END + "\n")
        elif turn["from"] == "function_call":
            call = json.dumps(json.loads(turn["value"]), ensure_ascii=False)
            parts.append(f"<tool_call>{call}</tool_call>{END}\n")
    return "".join(parts)


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_rows_learn_exactly_the_answers(name, shared):
    """For ~50 rows spread over the file: the loss tokens decode to the answers and nothing else, and the input ids are
    the tokenizer's own apply_chat_template output (BOS + text + EOS for raw text)."""
    relative, fmt, rows, *_ = REAL_FILES[name]
    step = max(1, rows // 50)
    tokenizer = builtin_chatml()
    src = source(shared / relative, format=fmt)
    checked = 0
    for index, row in enumerate(read_rows(src)):
        if index % step or row.data.get("output") == "":
            continue
        example = to_example(row.data, fmt, src)
        ids, labels = encode(example, tokenizer, completion_only_loss=True)
        assert loss_text(tokenizer, ids, labels) == expected_loss_text(row.data, fmt), row.location
        if isinstance(example, Conversation):
            assert ids == template_ids(tokenizer, example.messages, tools=example.tools), row.location
        else:
            body = tokenizer(row.data["text"], add_special_tokens=False)["input_ids"]
            assert ids == [tokenizer.bos_token_id, *body, tokenizer.eos_token_id], row.location
        checked += 1
    assert checked >= 45


def test_glaive_tool_definitions_and_results_are_prompt(shared):
    """Every tool-calling row: its tools are listed in the system turn, each call is learned in <tool_call>
    form, and each tool result is in the text without loss."""
    tokenizer = builtin_chatml()
    src = source(shared / REAL_FILES["glaive_toolcall"][0], format="sharegpt")
    calls = 0
    for row in read_rows(src):
        example = to_example(row.data, "sharegpt", src)
        ids, labels = encode(example, tokenizer, completion_only_loss=True)
        text, learned = tokenizer.decode(ids), loss_text(tokenizer, ids, labels)
        for tool in json.loads(row.data["tools"] or "[]"):
            assert json.dumps(tool, ensure_ascii=False) in text.split("<|im_start|>user")[0], row.location
        for turn in row.data["conversations"]:
            if turn["from"] == "function_call":
                calls += 1
                assert turn["value"].split('"arguments"')[0] in learned, row.location
            if turn["from"] == "observation":
                assert f"<|im_start|>tool\n{turn['value']}{END}" in text and turn["value"] not in learned
    assert calls == 211  # the file's function_call turns
