"""From generated token ids to what an OpenAI client reads: the answer's text, its pieces while it streams,
and the tool calls in it.

A chat answer's text is `loratool generate`'s (loratool.generate.run.answer_text: special tokens skipped,
cut before the first stop text, stripped); a completion's is the raw continuation, cut the same way but not
stripped, since its leading space belongs to it. While streaming, text that may still turn out to be the
start of a stop text (or of a tool call, or half of a UTF-8 character) is held back, so the pieces always add
up to the text a non-streamed answer has.

Tool calls are read in the format loratool's ChatML template trains (and Hermes, Qwen and SmolLM use):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Other formats come back as text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from loratool.generate.run import answer_text, held_back

TOOL_CALL_START = "<tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def chat_text(tokenizer: Any, ids: list[int], stops: list[str]) -> str:
    return answer_text(tokenizer, ids, stops)


def completion_text(tokenizer: Any, ids: list[int], stops: list[str]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return _cut(text, stops)


def _cut(text: str, stops: list[str]) -> str:
    """`text` before the first of `stops` it holds."""
    hits = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(hits)] if hits else text


def tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The text outside tool calls (None when there is none) and the calls, in OpenAI's shape. A block that
    is not a JSON object with a name stays in the text."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for match in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        arguments = call.get("arguments", call.get("parameters", {}))
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {
                    "name": call["name"],
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
        )
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


class Pieces:
    """The new text of a streamed answer after each step: what can no longer change."""

    def __init__(self, tokenizer: Any, stops: list[str], *, chat: bool, tools: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stops = [stop for stop in stops if stop]
        self.chat = chat  # chat answers are stripped, completions are not
        self.held = [*self.stops, *([TOOL_CALL_START] if tools else [])]
        self.sent = ""

    def add(self, ids: list[int]) -> str:
        """The text to send now, given every id generated so far."""
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [text.find(stop) for stop in self.held if stop in text]
        if hits:
            text = text[: min(hits)]
        else:
            text = text[: len(text) - held_back(text, self.held)]
        text = text.rstrip("\ufffd")  # half a character: its other bytes are still to come
        if self.chat:
            text = text.lstrip()
            text = text.rstrip()  # trailing space is sent with what follows it (the final answer is stripped)
        return self._send(text)

    def last(self, final: str) -> str:
        """The rest of the final text."""
        return self._send(final)

    def _send(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece
