"""Turning a row into an example: a Conversation (chat messages) or a Completion (prompt + completion text).

One small function per row layout (`alpaca`, `messages`, `sharegpt`, `prompt_completion`, `text`). A row
that does not fit its layout raises RowError with the reason; the caller adds the row's location and
decides whether to fail or skip (`data.on_bad_row`).
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    from loratool.recipe import DataSource

ROLES = ("user", "assistant", "system", "tool")

# The fields each format reads, as they are called when `columns` renames nothing; the first ones are
# required and are what `auto` looks for in the first row.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
FIELDS: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "role", "content", "tools"),
    "sharegpt": ("conversations", "from", "value", "role", "content", "tools", "system"),
    "alpaca": ("instruction", "input", "output", "system"),
    "prompt_completion": ("prompt", "completion", "role", "content", "tools"),
    "text": ("text",),
}

MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool",
                 "developer": "system", "function": "tool"}  # fmt: skip
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
    "function": "tool",
}
# Message keys passed on to the chat template besides role and content (OpenAI-style tool calling).
_EXTRA_MESSAGE_KEYS = ("tool_calls", "tool_call_id", "name")


@dataclass(frozen=True)
class Conversation:
    """Chat messages ({"role", "content", ...}) rendered by the chat template; loss on assistant turns.

    `trained_from`: only assistant messages at this index or later carry loss (conversational
    prompt-completion rows put the prompt's own assistant turns, if any, before it)."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None
    trained_from: int = 0


@dataclass(frozen=True)
class Completion:
    """Raw text with no chat template: loss on `completion` (and the EOS after it)."""

    prompt: str
    completion: str


Example = Conversation | Completion


class RowError(Exception):
    """A row that does not fit its format. kind: `malformed` (follows data.on_bad_row) or `empty`
    (nothing to learn from, e.g. an empty output: always dropped and counted, never fatal)."""

    def __init__(self, reason: str, kind: str = "malformed"):
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


def resolve_format(source: DataSource, first: dict[str, Any] | None, location: str = "") -> str:
    """The source's format; for `auto`, detected from the keys of its first row (after `columns`)."""
    if source.format != "auto":
        return source.format
    if first is None:
        return "auto"  # no readable row: nothing to detect from, and nothing will be encoded
    keys = _renamed_keys(first, source.columns)
    for fmt, needed in REQUIRED_FIELDS.items():
        if all(key in keys for key in needed):
            return fmt
    found = ", ".join(sorted(first)) or "none"
    formats = "; ".join(f"{fmt}: {', '.join(needed)}" for fmt, needed in REQUIRED_FIELDS.items())
    raise LoratoolError(
        f"data source {source.path}: cannot detect the format from the first row ({location}); "
        f"its keys are: {found}",
        hint=f"set `format:` for this source, and `columns:` to map your field names to the format's "
        f"({formats}); e.g. format: alpaca, columns: {{instruction: question, output: answer}}",
    )


def check_columns(source: DataSource, fmt: str) -> None:
    """`columns` may only rename fields that the format reads: catch typos before reading any row."""
    if fmt != "auto":
        check_fields(source, FIELDS[fmt], f"format {fmt}")


def check_fields(source: DataSource, fields: tuple[str, ...] | list[str], layout: str) -> None:
    """`columns` may only rename `fields` (what `layout` reads); `roles` must map to real roles."""
    for name in source.columns:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            raise LoratoolError(
                f"data source {source.path}: columns.{name} is not a field of {layout}"
                + (f" — did you mean {close[0]}?" if close else ""),
                hint=f"{layout} reads: {', '.join(fields)}; columns maps those names to yours",
            )
    for role, target in source.roles.items():
        if target not in ROLES:
            raise LoratoolError(
                f"data source {source.path}: roles.{role} maps to '{target}', which is not a role",
                hint=f"map each role of your file to one of {', '.join(ROLES)}",
            )


def to_example(row: dict[str, Any], fmt: str, source: DataSource) -> Example:
    """One row -> one example, or RowError saying what does not fit."""
    reader = _READERS[fmt]
    return reader(_Fields(row, source.columns), source)


# ---------------------------------------------------------------------------------------------------------
# One reader per format
# ---------------------------------------------------------------------------------------------------------


def _alpaca(row: _Fields, source: DataSource) -> Example:
    instruction = row.string("instruction")
    extra = row.string("input", required=False)
    output = row.string("output")
    system = row.string("system", required=False)
    if not output.strip():
        raise RowError(f"field {row.name('output')!r} is empty", kind="empty")
    user = instruction + ("\n\n" + extra if extra else "")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Conversation(_with_system(messages, system or source.system_prompt))


def _messages(row: _Fields, source: DataSource) -> Example:
    messages = _message_list(row, "messages", "role", "content", {**MESSAGE_ROLES, **source.roles})
    return Conversation(_with_system(messages, source.system_prompt), tools=row.tools())


def _sharegpt(row: _Fields, source: DataSource) -> Example:
    role_key = "role" if "role" in source.columns else "from"
    content_key = "content" if "content" in source.columns else "value"
    turns = row.get("conversations")
    if not source.columns.keys() & {"from", "role"} and isinstance(turns, list) and turns:
        if isinstance(turns[0], dict) and "from" not in turns[0] and "role" in turns[0]:
            role_key, content_key = "role", "content"  # ShareGPT files written with OpenAI message keys
    messages = _message_list(row, "conversations", role_key, content_key, {**SHAREGPT_ROLES, **source.roles})
    for turn, message in zip(turns, messages, strict=True):  # _message_list checked that turns is a list
        if turn.get(row.name(role_key)) == "function_call" and message["role"] == "assistant":
            _function_call_to_tool_calls(message)
    system = row.string("system", required=False)
    return Conversation(_with_system(messages, system or source.system_prompt), tools=row.tools())


def _prompt_completion(row: _Fields, source: DataSource) -> Example:
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        roles = {**MESSAGE_ROLES, **source.roles}
        prompt_messages = _message_list(row, "prompt", "role", "content", roles, allow_empty=True)
        completion_messages = _message_list(row, "completion", "role", "content", roles)
        messages = _with_system(prompt_messages + completion_messages, source.system_prompt)
        trained_from = len(messages) - len(completion_messages)
        return Conversation(messages, tools=row.tools(), trained_from=trained_from)
    prompt = row.string("prompt")
    completion = row.string("completion")
    if not completion.strip():
        raise RowError(f"field {row.name('completion')!r} is empty", kind="empty")
    return Completion(prompt, completion)


def _text(row: _Fields, source: DataSource) -> Example:
    text = row.string("text")
    if not text.strip():
        raise RowError(f"field {row.name('text')!r} is empty", kind="empty")
    return Completion("", text)


_READERS = {
    "alpaca": _alpaca,
    "messages": _messages,
    "sharegpt": _sharegpt,
    "prompt_completion": _prompt_completion,
    "text": _text,
}


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


class _Fields:
    """A row seen through `columns`: `get("output")` reads the file's column that output is mapped to."""

    def __init__(self, row: dict[str, Any], columns: dict[str, str]):
        self.row = row
        self.columns = columns

    def name(self, field: str) -> str:
        return self.columns.get(field, field)

    def get(self, field: str) -> Any:
        return self.row.get(self.name(field))

    def string(self, field: str, required: bool = True) -> str:
        value = self.get(field)
        if value is None:  # absent, JSON null, an empty parquet cell, a short CSV row
            if required:
                raise RowError(f"field {self.name(field)!r} is missing")
            return ""
        if not isinstance(value, str):
            raise RowError(f"field {self.name(field)!r} must be a string, got {_type_name(value)}")
        return value

    def tools(self) -> list[Any] | None:
        value = self.get("tools")
        if value is None or value == "":
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RowError(f"field {self.name('tools')!r} is not valid JSON: {exc.msg}") from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise RowError(f"field {self.name('tools')!r} must be a list of tools, got {_type_name(value)}")
        return value or None


def _message_list(
    row: _Fields,
    field: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str],
    allow_empty: bool = False,
) -> list[dict[str, Any]]:
    value = row.get(field)
    name = row.name(field)
    if value is None:
        raise RowError(f"field {name!r} is missing")
    if not isinstance(value, list):
        raise RowError(f"field {name!r} must be a list of messages, got {_type_name(value)}")
    if not value and not allow_empty:
        raise RowError(f"empty conversation: field {name!r} is an empty list")
    role_name, content_name = row.name(role_key), row.name(content_key)
    messages = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, dict):
            raise RowError(f"{where} must be a message object, got {_type_name(item)}")
        role = item.get(role_name)
        if not isinstance(role, str):
            what = "is missing" if role is None else f"must be a string, got {_type_name(role)}"
            raise RowError(f"{where}.{role_name} {what}")
        if role not in roles:
            raise RowError(
                f"{where}: unknown role {role!r} — add it under roles: in this data source "
                f"(e.g. roles: {{{role}: user}}); known roles: {', '.join(sorted(roles))}"
            )
        content = item.get(content_name)
        message: dict[str, Any] = {"role": roles[role]}
        for key in _EXTRA_MESSAGE_KEYS:
            if item.get(key) is not None:
                message[key] = item[key]
        if content is None and "tool_calls" in message:
            content = ""  # an OpenAI tool-call message has content null
        if not isinstance(content, str):
            what = "is missing" if content is None else f"must be a string, got {_type_name(content)}"
            raise RowError(f"{where}.{content_name} {what}")
        message["content"] = content
        messages.append(message)
    return messages


def _function_call_to_tool_calls(message: dict[str, Any]) -> None:
    """A ShareGPT `function_call` turn (Glaive / LLaMA-Factory: the value is the JSON text of
    {"name", "arguments"}, or of a list of them) -> an assistant message with OpenAI-style `tool_calls`.

    Why: chat templates write tool calls in their own syntax (ChatML's <tool_call>...</tool_call>, which
    its tools preamble asks the model to use); kept as plain text the call would be learned without it.
    A value that is not such JSON stays text. Templates that ignore tool_calls get the JSON back as text
    at render time (tokenize.render_conversation), so nothing is lost either way."""
    try:
        value = json.loads(message["content"])
    except json.JSONDecodeError:
        return
    calls = value if isinstance(value, list) else [value]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        return
    message["tool_calls"] = [
        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
        for c in calls
    ]
    message["content"] = ""


def _with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}, *messages]
    return messages


def _renamed_keys(row: dict[str, Any], columns: dict[str, str]) -> set[str]:
    """The row's keys under the format's names: a file column that `columns` maps a field to counts as
    that field."""
    renamed = {field for field, column in columns.items() if column in row}
    return renamed | (set(row) - set(columns.values()))


def _type_name(value: Any) -> str:
    names = {
        str: "a string",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), f"a {type(value).__name__}")
