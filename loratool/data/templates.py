"""Chat templates: keep the tokenizer's own, or set a built-in one (loratool/templates/*.jinja) or a file.

The chosen template becomes `tokenizer.chat_template`, so it is saved with the tokenizer next to the
adapter and inference formats prompts exactly as training did.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError

BUILTIN_TEMPLATES = ("chatml", "llama2", "llama3", "mistral", "zephyr", "alpaca")

# What closes an assistant turn in each built-in template; None = the tokenizer's eos_token.
_END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
_PROBE_CALL = "loratool_probe_function"
_TOOL_CALL_PROBE = [
    {"role": "user", "content": "Hi"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {"name": _PROBE_CALL, "arguments": {}}}],
    },
]
_TOOLS_PROBE = [
    {
        "type": "function",
        "function": {
            "name": _PROBE_CALL,
            "description": "",
            "parameters": {"type": "object", "properties": {}},
        },
    }
]
# template text -> answer, per question (templates are few, rows many)
_renders_tool_calls: dict[str, bool] = {}
_renders_tools: dict[str, bool] = {}


def builtin_template(name: str) -> str:
    """The Jinja text of a built-in template."""
    return (resources.files("loratool") / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def apply_chat_template_choice(tokenizer: Any, choice: str | None) -> None:
    """Set `tokenizer.chat_template` from `data.chat_template` (None: keep the tokenizer's own, which
    must then exist). The template is tried on a two-message conversation, so that a broken one fails
    here, once, rather than on every row."""
    if choice is None:
        if not tokenizer.chat_template:
            raise LoratoolError(
                f"the tokenizer of {_model_name(tokenizer)} has no chat template, and the data has "
                "conversations to render with one",
                hint=f"set data.chat_template to a built-in ({', '.join(BUILTIN_TEMPLATES)}) or the path "
                "of a .jinja file; chatml suits most base models",
            )
        _probe(tokenizer, "the tokenizer's own chat template")
        return
    if choice.endswith((".jinja", ".j2")):
        path = Path(choice).expanduser()
        if not path.is_file():
            raise LoratoolError(
                f"data.chat_template: template file not found: {path.resolve()}",
                hint="relative paths are resolved against the recipe file's directory; "
                f"or use a built-in: {', '.join(BUILTIN_TEMPLATES)}",
            )
        text, what = path.read_text(encoding="utf-8"), f"the chat template {path}"
    elif choice in BUILTIN_TEMPLATES:
        if choice not in _END_OF_TURN and not tokenizer.eos_token:
            raise LoratoolError(
                f"data.chat_template: {choice} ends each answer with the eos_token, and the tokenizer of "
                f"{_model_name(tokenizer)} has none",
                hint="use chatml or llama3, whose end-of-turn markers are written in the template",
            )
        text, what = builtin_template(choice), f"the built-in chat template {choice}"
    else:
        close = difflib.get_close_matches(choice, BUILTIN_TEMPLATES, n=1)
        raise LoratoolError(
            f"data.chat_template: unknown template {choice!r}"
            + (f" — did you mean {close[0]}?" if close else ""),
            hint=f"use a built-in ({', '.join(BUILTIN_TEMPLATES)}) or the path of a .jinja / .j2 file",
        )
    tokenizer.chat_template = text
    _probe(tokenizer, what)


def describe_choice(choice: str | None) -> str:
    """How the summary names the template in use."""
    if choice is None:
        return "the tokenizer's own"
    return f"{choice} (built-in)" if choice in BUILTIN_TEMPLATES else choice


def template_warnings(tokenizer: Any, choice: str | None) -> list[str]:
    """Things about a built-in template that train fine but surprise at inference time."""
    if choice not in BUILTIN_TEMPLATES:
        return []
    warnings = []
    vocab = tokenizer.get_vocab()
    missing = [marker for marker in _MARKERS.get(choice, ()) if marker not in vocab]
    if missing:
        warnings.append(
            f"chat template {choice}: {', '.join(missing)} not in this tokenizer's vocabulary, so the model "
            "learns the markers as several pieces; add them as special tokens (and train embed_tokens and "
            "lm_head) for a cleaner stop"
        )
    end = _END_OF_TURN.get(choice)
    if end and end in vocab and end != tokenizer.eos_token:
        warnings.append(
            f"chat template {choice}: turns end with {end} but the tokenizer's eos_token is "
            f"{tokenizer.eos_token}; make generation stop on {end} (generation_config.eos_token_id)"
        )
    return warnings


def renders_tool_calls(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes an assistant message's `tool_calls` into the text.

    Many templates (plain ChatML, Llama 2, Zephyr...) print only `content`, which for a tool-call message
    is empty: the call would silently vanish from the training text. Asked once per template text."""
    template = tokenizer.chat_template
    key = template if isinstance(template, str) else repr(template)
    if key not in _renders_tool_calls:
        try:
            text = tokenizer.apply_chat_template(_TOOL_CALL_PROBE, tokenize=False)
        except Exception:  # a template that refuses tool calls (or this probe) does not render them
            text = ""
        _renders_tool_calls[key] = _PROBE_CALL in text
    return _renders_tool_calls[key]


def renders_tools(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes the `tools` (function definitions) into the text.
    Templates without tool support drop them silently, and the model then learns calls to functions it was
    never shown."""
    template = tokenizer.chat_template
    key = template if isinstance(template, str) else repr(template)
    if key not in _renders_tools:
        try:
            text = tokenizer.apply_chat_template(_PROBE, tools=_TOOLS_PROBE, tokenize=False)
        except Exception:  # a template that fails with tools does not render them
            text = ""
        _renders_tools[key] = _PROBE_CALL in text
    return _renders_tools[key]


def _probe(tokenizer: Any, what: str) -> None:
    try:
        tokenizer.apply_chat_template(_PROBE, tokenize=False)
    except Exception as exc:  # jinja2 TemplateSyntaxError / TemplateError, or a template's raise_exception
        line = getattr(exc, "lineno", None)
        raise LoratoolError(
            f"{what}{f' (line {line})' if line else ''} fails on a plain user/assistant conversation: {exc}",
            hint=f"fix the template, or set data.chat_template to a built-in: {', '.join(BUILTIN_TEMPLATES)}",
        ) from None


def _model_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or "this model"
