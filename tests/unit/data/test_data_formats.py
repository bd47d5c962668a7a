"""Rows -> examples: every format, column and role mapping, auto-detection, and the row errors."""

from __future__ import annotations

import json

import pytest

from helpers.data import source
from loratool.data.formats import (
    Completion,
    Conversation,
    RowError,
    check_columns,
    resolve_format,
    to_example,
)
from loratool.errors import LoratoolError


def example(row: dict, fmt: str, **fields):
    return to_example(row, fmt, source("data.jsonl", format=fmt, **fields))


def row_error(row: dict, fmt: str, **fields) -> RowError:
    with pytest.raises(RowError) as err:
        example(row, fmt, **fields)
    return err.value


# --- alpaca -----------------------------------------------------------------------------------------------


def test_alpaca_without_input():
    ex = example({"instruction": "Say hi.", "output": "Hi!"}, "alpaca")
    assert ex == Conversation(
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
    )


def test_alpaca_with_input_and_system():
    ex = example({"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "Be exact."}, "alpaca")
    assert ex.messages == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]


def test_alpaca_empty_input_adds_nothing_and_system_prompt_fills_in():
    ex = example(
        {"instruction": "Hi", "input": "", "output": "Hello"}, "alpaca", system_prompt="You are kind."
    )
    assert ex.messages[0] == {"role": "system", "content": "You are kind."}
    assert ex.messages[1] == {"role": "user", "content": "Hi"}


def test_alpaca_column_mapping():
    row = {"question": "Capital of France?", "context": "Europe", "answer": "Paris"}
    ex = example(row, "alpaca", columns={"instruction": "question", "input": "context", "output": "answer"})
    assert ex.messages[0]["content"] == "Capital of France?\n\nEurope"
    assert ex.messages[1]["content"] == "Paris"


def test_alpaca_row_errors_name_the_field():
    assert row_error({"instruction": "x"}, "alpaca").reason == "field 'output' is missing"
    assert (
        row_error({"instruction": "x", "output": 42}, "alpaca").reason
        == "field 'output' must be a string, got a number"
    )
    mapped = row_error({"question": "x"}, "alpaca", columns={"instruction": "question", "output": "answer"})
    assert mapped.reason == "field 'answer' is missing"
    empty = row_error({"instruction": "x", "output": "  "}, "alpaca")
    assert (empty.reason, empty.kind) == ("field 'output' is empty", "empty")


# --- messages ---------------------------------------------------------------------------------------------


def test_messages_keeps_roles_and_tool_calls():
    call = [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]
    row = {
        "messages": [
            {"role": "user", "content": "Call f"},
            {"role": "assistant", "content": None, "tool_calls": call},
            {"role": "tool", "content": "42", "tool_call_id": "1"},
            {"role": "assistant", "content": "It is 42."},
        ],
        "tools": json.dumps([{"type": "function", "function": {"name": "f"}}]),
    }
    ex = example(row, "messages")
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool", "assistant"]
    assert ex.messages[1] == {"role": "assistant", "content": "", "tool_calls": call}
    assert ex.messages[2]["tool_call_id"] == "1"
    assert ex.tools == [{"type": "function", "function": {"name": "f"}}]


def test_messages_column_and_role_mapping():
    row = {"dialog": [{"speaker": "customer", "text": "Hi"}, {"speaker": "agent", "text": "Hello"}]}
    ex = example(
        row,
        "messages",
        columns={"messages": "dialog", "role": "speaker", "content": "text"},
        roles={"customer": "user", "agent": "assistant"},
    )
    assert ex.messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_messages_row_errors():
    assert (
        row_error({"messages": "hi"}, "messages").reason
        == "field 'messages' must be a list of messages, got a string"
    )
    assert (
        row_error({"messages": []}, "messages").reason
        == "empty conversation: field 'messages' is an empty list"
    )
    bad_content = row_error({"messages": [{"role": "user", "content": ["x"]}]}, "messages")
    assert bad_content.reason == "messages[0].content must be a string, got a list"
    unknown = row_error({"messages": [{"role": "customer", "content": "x"}]}, "messages")
    assert unknown.reason.startswith("messages[0]: unknown role 'customer' — add it under roles:")
    assert "roles: {customer: user}" in unknown.reason
    assert row_error({"messages": [{"content": "x"}]}, "messages").reason == "messages[0].role is missing"


# --- sharegpt ---------------------------------------------------------------------------------------------


GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "Find a chicken recipe."},
        {"from": "function_call", "value": '{"name": "search_recipes", "arguments": {"q": "chicken"}}'},
        {"from": "observation", "value": '{"recipes": ["stir fry"]}'},
        {"from": "gpt", "value": "Try the stir fry."},
    ],
    "tools": '[{"name": "search_recipes", "description": "Search", "parameters": {"type": "object"}}]',
}


def test_sharegpt_with_tool_call_and_observation():
    ex = example(GLAIVE_ROW, "sharegpt")
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool", "assistant"]
    call = {"name": "search_recipes", "arguments": {"q": "chicken"}}
    tool_calls = [{"type": "function", "function": call}]
    assert ex.messages[1] == {"role": "assistant", "content": "", "tool_calls": tool_calls}
    assert ex.tools == [{"name": "search_recipes", "description": "Search", "parameters": {"type": "object"}}]


def test_sharegpt_role_mapping_and_system_field():
    row = {"conversations": [{"from": "asker", "value": "Q"}, {"from": "gpt", "value": "A"}], "system": "Sys"}
    ex = example(row, "sharegpt", roles={"asker": "user"})
    assert ex.messages == [
        {"role": "system", "content": "Sys"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_sharegpt_custom_keys():
    row = {"chat": [{"speaker": "human", "text": "Q"}, {"speaker": "bot", "text": "A"}]}
    ex = example(
        row,
        "sharegpt",
        columns={"conversations": "chat", "from": "speaker", "value": "text"},
        roles={"bot": "assistant"},
    )
    assert ex.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_sharegpt_errors():
    assert row_error({"conversations": []}, "sharegpt").reason.startswith("empty conversation")
    unknown = row_error({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")
    assert "unknown role 'robot'" in unknown.reason
    bad_tools = row_error({**GLAIVE_ROW, "tools": "[{"}, "sharegpt")
    assert bad_tools.reason.startswith("field 'tools' is not valid JSON")


# --- prompt_completion and text ---------------------------------------------------------------------------


def test_prompt_completion_strings_are_raw_text():
    assert example({"prompt": "2+2=", "completion": "4"}, "prompt_completion") == Completion("2+2=", "4")


def test_prompt_completion_conversational_trains_on_the_completion_only():
    row = {
        "prompt": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
        ],
        "completion": [{"role": "assistant", "content": "See you"}],
    }
    ex = example(row, "prompt_completion", system_prompt="Sys")
    assert isinstance(ex, Conversation)
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert ex.trained_from == 4


def test_prompt_completion_mixed_types_is_an_error():
    err = row_error({"prompt": [{"role": "user", "content": "x"}], "completion": "y"}, "prompt_completion")
    assert err.reason == "field 'prompt' must be a string, got a list"


def test_text():
    assert example({"text": "Once upon a time."}, "text") == Completion("", "Once upon a time.")
    assert row_error({"text": ""}, "text").kind == "empty"
    assert row_error({"body": "x"}, "text").reason == "field 'text' is missing"


# --- auto-detection and columns ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "columns", "expected"),
    [
        ({"messages": []}, {}, "messages"),
        ({"conversations": [], "tools": ""}, {}, "sharegpt"),
        ({"instruction": "", "input": "", "output": ""}, {}, "alpaca"),
        ({"prompt": "", "completion": ""}, {}, "prompt_completion"),
        ({"text": "", "meta": 1}, {}, "text"),
        ({"question": "", "answer": ""}, {"instruction": "question", "output": "answer"}, "alpaca"),
        ({"dialog": []}, {"messages": "dialog"}, "messages"),
    ],
)
def test_auto_detection(row, columns, expected):
    assert resolve_format(source("d.jsonl", columns=columns), row) == expected


def test_explicit_format_wins():
    assert resolve_format(source("d.jsonl", format="text"), {"messages": []}) == "text"


def test_undetectable_format_names_keys_and_formats():
    with pytest.raises(LoratoolError) as err:
        resolve_format(source("data/qa.jsonl"), {"question": "q", "answer": "a"}, "data/qa.jsonl:1")
    message, hint = err.value.message, err.value.hint
    assert "data/qa.jsonl" in message and "data/qa.jsonl:1" in message
    assert "answer, question" in message
    assert "alpaca: instruction, output" in hint and "sharegpt: conversations" in hint
    assert "format:" in hint and "columns:" in hint


def test_columns_must_name_fields_of_the_format():
    with pytest.raises(LoratoolError) as err:
        check_columns(source("d.jsonl", columns={"instrction": "q"}), "alpaca")
    assert (
        "columns.instrction is not a field of format alpaca — did you mean instruction?" in err.value.message
    )


def test_roles_must_map_to_known_roles():
    with pytest.raises(LoratoolError) as err:
        check_columns(source("d.jsonl", roles={"bot": "robot"}), "sharegpt")
    assert "roles.bot maps to 'robot'" in err.value.message
