"""Answer text for OpenAI clients: streamed pieces add up to the whole answer (stops, spaces, half
characters, tool calls held back), tool calls are read from the text, and requests are validated."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from loratool.serve.answers import Pieces, chat_text, completion_text, tool_calls
from loratool.serve.http_errors import ApiError

SPECIAL = {b"<|im_end|>"}


class ByteTokens:
    """A tokenizer whose tokens are byte strings: decoding a prefix can end in half a UTF-8 character, as
    byte-level BPE does."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        kept = [self.pieces[i] for i in ids if not (skip_special_tokens and self.pieces[i] in SPECIAL)]
        return b"".join(kept).decode("utf-8", errors="replace")


def streamed(
    pieces: list[bytes], stops: list[str], *, chat: bool = True, tools: bool = False
) -> tuple[str, str]:
    """(the text streamed piece by piece then completed with the final text, the final text)."""
    tokenizer = ByteTokens(pieces)
    ids = list(range(len(pieces)))
    stream = Pieces(tokenizer, stops, chat=chat, tools=tools)
    sent = [stream.add(ids[: n + 1]) for n in range(len(ids))]
    final = chat_text(tokenizer, ids, stops) if chat else completion_text(tokenizer, ids, stops)
    if tools:
        final = tool_calls(final)[0] or ""
    sent.append(stream.last(final))
    return "".join(sent), final


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        ([b"Hel", b"lo", b" wor", b"ld", b" ", b"<|im_end|>"], [], "Hello world"),
        ([b" ", b"\n", b"hi", b"  "], [], "hi"),  # the answer is stripped, as `loratool generate` prints it
        ([b"ab", b"E", b"N", b"D", b"zz"], ["END"], "ab"),  # a stop text across tokens is never sent
        ([b"ab", b"E", b"x", b"END"], ["END"], "abEx"),  # what only looked like a stop's start is sent
        ([b"caf", b"\xc3", b"\xa9", b"!"], [], "caf\u00e9!"),  # half a character waits for its other byte
    ],
)
def test_streamed_pieces_add_up_to_the_whole_answer(pieces, stops, expected):
    text, final = streamed(pieces, stops)
    assert final == expected
    assert text == expected


def test_no_piece_ever_holds_a_stop_text_or_half_a_character():
    pieces = [b"ok", b" ", b"\xc3", b"\xa9", b"S", b"TO", b"P", b"more"]
    stream = Pieces(ByteTokens(pieces), ["STOP"], chat=True)
    sent = [stream.add(list(range(n + 1))) for n in range(len(pieces))]
    assert all("S" not in piece and "\ufffd" not in piece for piece in sent)
    assert "".join(sent) == "ok \u00e9"


def test_a_completion_keeps_its_leading_space_and_is_cut_at_the_stop():
    text, final = streamed([b" Once", b" upon", b" a", b" time"], [" a"], chat=False)
    assert final == text == " Once upon"


def test_a_streamed_tool_call_is_held_back_and_the_text_around_it_sent():
    call = b'{"name": "get_weather", "arguments": {"city": "Paris"}}'
    pieces = [b"Sure", b" ", b"<tool", b"_call>", call, b"</tool_call>", b"<|im_end|>"]
    text, final = streamed(pieces, [], tools=True)
    assert text == final == "Sure"


def test_tool_calls_are_read_in_openai_shape():
    content, calls = tool_calls(
        'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    assert content == "Let me check."
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


@pytest.mark.parametrize(
    "text", ["<tool_call>not json</tool_call>", '<tool_call>["a list"]</tool_call>', "plain"]
)
def test_text_that_is_no_tool_call_stays_text(text):
    assert tool_calls(text) == (text, [])


# --- requests --------------------------------------------------------------------------------------------------


def test_request_fields_are_validated_as_openai_does():
    from loratool.serve.api import ChatRequest

    ok = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], stop="END", user="someone")
    assert (
        ok.stop == ["END"] and ok.temperature is None
    )  # one stop becomes a list; unknown fields are ignored
    assert ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}]).stop == []
    for bad in (
        {"temperature": 2.5},
        {"top_p": 0},
        {"max_tokens": 0},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
    ):
        with pytest.raises(ValidationError):
            ChatRequest(**{"model": "m", "messages": [{"role": "user", "content": "hi"}], **bad})


def test_conversation_keeps_the_request_system_message_and_reads_tool_call_arguments():
    from loratool.serve.api import Message, _conversation

    system, turns = _conversation(
        [
            Message(role="developer", content="Be brief."),
            Message(
                role="user",
                content=[{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
            ),
            Message(
                role="assistant",
                content=None,
                tool_calls=[
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            ),  # fmt: skip
            Message(role="tool", content="sunny", tool_call_id="c1"),
        ]
    )
    assert system == "Be brief."  # a developer message is the system message
    assert turns[0] == {"role": "user", "content": "Weather in Paris?"}
    assert turns[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # templates print objects
    assert turns[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}
    assert _conversation([Message(role="user", content="hi")])[0] is None  # None: the trained system prompt


def test_image_content_is_refused():
    from loratool.serve.api import Message, _conversation

    with pytest.raises(ApiError) as caught:
        _conversation([Message(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}])])
    assert caught.value.status == 400 and "image_url" in caught.value.message


def test_token_budget_refuses_with_both_numbers():
    from loratool.serve.api import Limits, _budget

    served = SimpleNamespace(adapters=SimpleNamespace(loaded=SimpleNamespace(context=100)))
    limits = Limits(max_tokens=50)
    assert _budget(served, limits, 30, None) == 50  # the server's limit when none is asked
    assert _budget(served, limits, 80, None) == 20  # what the context leaves
    assert _budget(served, limits, 30, 7) == 7
    with pytest.raises(ApiError) as caught:
        _budget(served, limits, 90, 20)
    assert caught.value.status == 400 and caught.value.code == "context_length_exceeded"
    assert "maximum context length is 100 tokens" in caught.value.message
    assert "110 tokens (90 in the messages, 20 in the completion)" in caught.value.message
    with pytest.raises(ApiError, match="above this server's limit of 50"):
        _budget(served, limits, 10, 51)


def test_error_body_is_openais():
    error = ApiError(404, "no such model", param="model", code="model_not_found")
    assert error.body() == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert ApiError(429, "busy").body()["error"]["type"] == "rate_limit_error"
