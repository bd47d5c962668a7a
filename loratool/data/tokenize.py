"""Tokenizing and masking: an example -> (input_ids, labels), labels = -100 where there is no loss.

Conversations are rendered by the chat template once, and tokenized once, exactly as
`tokenizer.apply_chat_template(messages, tokenize=True)` would. What carries loss is found in the rendered
text: an assistant turn spans from the end of the conversation rendered up to it with the generation
prompt, to the end of the conversation rendered up to and including it, so the span holds the answer and
the template's end-of-turn marker (<|im_end|>, </s>, <|eot_id|>), and the model learns to stop. A token
carries loss when it starts inside such a span (character offsets from the fast tokenizer). When the
tokenizer puts a BOS before text and the template does not write one, the BOS is put first
(templates.with_bos), as generation does.

Completions (raw text) are tokenized in two parts, prompt (with the tokenizer's BOS, if it adds one) and
completion (+ EOS), so the boundary is exact.

labels[i] is the target at position i (the model shifts by one itself). Position 0 is never predicted
(nothing comes before it), so its label is always -100: loss counts are then the tokens really learned.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from typing import Any

from loratool.data.formats import Completion, Conversation, Example, RowError
from loratool.data.templates import renders_tool_calls, with_bos
from loratool.errors import LoratoolError

IGNORE = -100
_BATCH = 512  # texts per tokenizer call: big enough for the Rust side to use every core


def encode(example: Example, tokenizer: Any, *, completion_only_loss: bool) -> tuple[list[int], list[int]]:
    """input_ids and labels of one example. Raises RowError when the chat template rejects the row."""
    result = encode_many([example], tokenizer, completion_only_loss=completion_only_loss)[0]
    if isinstance(result, RowError):
        raise result
    return result


def encode_many(
    examples: list[Example], tokenizer: Any, *, completion_only_loss: bool
) -> list[tuple[list[int], list[int]] | RowError]:
    """`encode` for many examples, with the tokenizer called on batches (one pass over each row).
    An example the chat template rejects comes back as its RowError, in its place."""
    require_fast(tokenizer)
    results: list[Any] = [None] * len(examples)
    conversations = [i for i, ex in enumerate(examples) if isinstance(ex, Conversation)]
    completions = [i for i, ex in enumerate(examples) if isinstance(ex, Completion)]

    rendered = []
    for i in conversations:
        try:
            rendered.append((i, *render_conversation(examples[i], tokenizer)))
        except RowError as exc:
            results[i] = exc
    for start in range(0, len(rendered), _BATCH):
        chunk = rendered[start : start + _BATCH]
        encoded = tokenizer(
            [text for _, text, _ in chunk],
            add_special_tokens=False,
            return_offsets_mapping=True,
            verbose=False,
        )
        for (i, _, spans), ids, offsets in zip(
            chunk, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            results[i] = (
                ids,
                _span_labels(ids, offsets, spans) if completion_only_loss else _mask_first(ids),
            )

    if completions:
        eos = tokenizer.eos_token_id
        if eos is None:
            raise LoratoolError(
                f"the tokenizer of {tokenizer.name_or_path or 'this model'} has no eos_token; raw-text "
                "examples end with it so that the model learns where a completion stops",
                hint="use a tokenizer that defines eos_token (model.tokenizer), or conversational data",
            )
    for start in range(0, len(completions), _BATCH):
        chunk = completions[start : start + _BATCH]
        prompts = tokenizer([examples[i].prompt for i in chunk], verbose=False)["input_ids"]
        answers = tokenizer([examples[i].completion for i in chunk], add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        for i, prompt_ids, answer_ids in zip(chunk, prompts, answers, strict=True):
            ids = prompt_ids + answer_ids + [eos]
            labels = (
                [IGNORE] * len(prompt_ids) + ids[len(prompt_ids) :] if completion_only_loss else list(ids)
            )
            results[i] = (ids, _mask_first(labels))
    return results


def render_conversation(conversation: Conversation, tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template (with the BOS the tokenizer adds to text, when the
    template leaves it out), and the character spans that carry loss."""
    messages, tools = conversation.messages, conversation.tools
    if any("tool_calls" in m for m in messages) and not renders_tool_calls(tokenizer):
        messages = [_tool_calls_as_text(m) for m in messages]
    text = _render(tokenizer, messages, tools, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < conversation.trained_from:
            continue
        # A conversation that opens with an assistant turn has no prefix to render: it starts at 0.
        before = _render(tokenizer, messages[:i], tools, add_generation_prompt=True) if i else ""
        upto = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], tools, False)
        for prefix in (before, upto):
            if not text.startswith(prefix):
                raise _not_prefix_stable(i, prefix, text)
        spans.append((len(before), len(upto)))
    full = with_bos(tokenizer, text)
    shift = len(full) - len(text)
    return full, [(start + shift, end + shift) for start, end in spans]


def _tool_calls_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """For a template that ignores `tool_calls`: the calls as JSON lines in the content, one per call
    ({"name": ..., "arguments": ...}, the plain form Glaive-style data and tools preambles use)."""
    if "tool_calls" not in message:
        return message
    calls = [call.get("function", call) if isinstance(call, dict) else call for call in message["tool_calls"]]
    lines = [json.dumps(call, ensure_ascii=False) for call in calls]
    content = "\n".join(([message["content"]] if message.get("content") else []) + lines)
    return {key: value for key, value in message.items() if key != "tool_calls"} | {"content": content}


def require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise LoratoolError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '') or 'this model'} is a slow (Python) "
            f"tokenizer ({type(tokenizer).__name__}); loss masks need a fast one's character offsets",
            hint="use a model whose repository has a tokenizer.json, or convert the tokenizer with "
            "AutoTokenizer.from_pretrained(..., use_fast=True) and save it",
        )


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # a template's raise_exception ("roles must alternate") or a missing key
        raise RowError(f"the chat template rejected this conversation: {exc}") from None


def _span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels keeping the tokens whose start offset lies in a span. Start offsets never decrease along a
    text, so each span is a contiguous run of tokens, found by bisection."""
    starts = [start for start, _ in offsets]
    labels = [IGNORE] * len(ids)
    for span_start, span_end in spans:
        first, stop = bisect_left(starts, span_start), bisect_left(starts, span_end)
        labels[first:stop] = ids[first:stop]
    return _mask_first(labels)


def _mask_first(labels: list[int]) -> list[int]:
    """A copy of the labels with position 0 masked."""
    labels = list(labels)
    if labels:
        labels[0] = IGNORE  # never predicted: nothing comes before it
    return labels


def _not_prefix_stable(index: int, prefix: str, text: str) -> LoratoolError:
    at = next(
        (k for k, (a, b) in enumerate(zip(prefix, text, strict=False)) if a != b), min(len(prefix), len(text))
    )
    return LoratoolError(
        f"the chat template is not prefix-stable: the conversation rendered up to message {index} differs "
        f"from the full conversation at character {at} ({prefix[at : at + 30]!r} vs {text[at : at + 30]!r}), "
        "so the assistant turns that carry loss cannot be located",
        hint="templates that rewrite earlier turns (e.g. drop past reasoning) do this; set "
        "data.chat_template to a built-in (chatml, llama3, llama2, mistral, zephyr, alpaca, gemma) or to a "
        ".jinja file that renders each message the same whatever follows it",
    )
