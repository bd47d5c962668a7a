"""Chat templates: keep the tokenizer's own, or set a built-in one (loratool/templates/*.jinja) or a file.

The chosen template becomes `tokenizer.chat_template`, so it is saved with the tokenizer next to the
adapter and inference formats prompts exactly as training did.

Two things every render goes through, in training, eval, generate and chat alike:
- BOS (`with_bos`): a tokenizer that puts a BOS before text (Llama, Mistral, Gemma: found by encoding, the
  flag is unreliable) was pretrained with it first. A template that does not write it (ChatML) would train
  and prompt the model without it (Gemma: answer loss 2.6 instead of 1.6, degenerate greedy output), so
  the BOS is put before the rendered text.
- The end of a turn (`end_of_turn`): the text the template closes an assistant turn with. When the
  vocabulary has it as one token, generation stops on that token; when it spells it in several (ChatML on
  a vocabulary without <|im_end|>), generation stops on the text, and answers are cut before it.
"""

from __future__ import annotations

import difflib
import json
import weakref
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from loratool.errors import LoratoolError

BUILTIN_TEMPLATES = ("chatml", "llama2", "llama3", "mistral", "zephyr", "alpaca", "gemma")

# What closes an assistant turn in each built-in template; None = the tokenizer's eos_token.
_END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}
_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}
# config.json model_type -> the built-in template of that family's chat models.
_FAMILY_TEMPLATES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3_text": "gemma",
    "mistral": "mistral",
    "qwen2": "chatml",
    "qwen2_moe": "chatml",
    "qwen3": "chatml",
    "qwen3_moe": "chatml",
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
_adds_bos: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()  # tokenizer -> answer
# template text -> answer, per question (templates are few, rows many)
_renders_tool_calls: dict[str, bool] = {}
_renders_tools: dict[str, bool] = {}


def builtin_template(name: str) -> str:
    """The Jinja text of a built-in template."""
    return (resources.files("loratool.data") / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")


def apply_chat_template_choice(tokenizer: Any, choice: str | None) -> None:
    """Set `tokenizer.chat_template` from `data.chat_template` (None: keep the tokenizer's own, which
    must then exist). The template is tried on a two-message conversation, so that a broken one fails
    here, once, rather than on every row."""
    if choice is None:
        if not tokenizer.chat_template:
            fitting, why = suggested_template(tokenizer)
            others = ", ".join(name for name in BUILTIN_TEMPLATES if name != fitting)
            raise LoratoolError(
                f"the tokenizer of {_model_name(tokenizer)} has no chat template, and the data has "
                "conversations to render with one",
                hint=f"set data.chat_template: {fitting} ({why}); or another built-in ({others}), or the "
                "path of a .jinja file",
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
                hint="use chatml, llama3 or gemma, whose end-of-turn markers are written in the template",
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


def suggested_template(tokenizer: Any) -> tuple[str, str]:
    """The built-in template that fits the model, and why: its family's (config.json model_type, next to
    the tokenizer), else the one whose turn markers the vocabulary has as tokens, else chatml."""
    model_type = _model_type(tokenizer)
    if model_type in _FAMILY_TEMPLATES:
        return _FAMILY_TEMPLATES[model_type], f"the chat format of {model_type} models"
    vocab = tokenizer.get_vocab()
    for name, markers in _MARKERS.items():
        if all(marker in vocab for marker in markers):
            return name, f"this vocabulary has its markers {', '.join(markers)}"
    return "chatml", "it suits most base models"


def _model_type(tokenizer: Any) -> str | None:
    """config.json's model_type of the model the tokenizer was loaded from (a local directory or a hub
    cache entry; never downloaded), or None."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return None
    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(name), "config.json")
        except Exception:  # not a hub id (a path that is not there, odd characters)
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        model_type = json.loads(path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if isinstance(model_type, str) else None


def adds_bos(tokenizer: Any) -> bool:
    """Whether tokenizer(text) puts a BOS first. Found by encoding: transformers 5 drops the add_bos_token
    flag on reload when tokenizer.json exists, so the post-processor is what tells."""
    try:
        return _adds_bos[tokenizer]
    except (KeyError, TypeError):  # not asked yet (TypeError: an object weakref cannot hold)
        pass
    bos = getattr(tokenizer, "bos_token_id", None)
    try:
        first = tokenizer("a", verbose=False)["input_ids"][:1]
        plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"][:1]
    except Exception:  # a tokenizer that cannot encode a probe adds nothing we can see
        first = plain = []
    answer = bos is not None and first == [bos] and plain != [bos]
    try:
        _adds_bos[tokenizer] = answer
    except TypeError:
        pass
    return answer


def with_bos(tokenizer: Any, text: str) -> str:
    """The rendered text with the tokenizer's BOS put first, when the tokenizer adds one to text and the
    template did not write it (see the module docstring); else the text as it is."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or text.startswith(bos) or not adds_bos(tokenizer):
        return text
    return bos + text


@dataclass(frozen=True)
class EndOfTurn:
    """What closes an assistant turn of the chat template: its text, and its token id when the vocabulary
    has that text as one token (None: generation has to stop on the text)."""

    text: str
    token_id: int | None


def end_of_turn(tokenizer: Any) -> EndOfTurn | None:
    """The chat template's end of an assistant turn (<|im_end|>, <end_of_turn>, </s>...): a special token
    right after the answer, else the first line of what follows it; None without a template, or when the
    template writes nothing after an answer."""
    if not tokenizer.chat_template:
        return None
    probe = "loratool-end-of-turn-probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:  # a template with rules of its own (roles, system prompt): EOS only
        return None
    after = text.split(probe, 1)[1].lstrip() if probe in text else ""
    ids = tokenizer(after, add_special_tokens=False, verbose=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {
        i for i, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    if ids and ids[0] in special:
        return EndOfTurn(tokenizer.convert_ids_to_tokens(ids[0]), int(ids[0]))
    marker = after.strip().split("\n", 1)[0].strip()
    if not marker:
        return None
    marker_ids = tokenizer(marker, add_special_tokens=False, verbose=False)["input_ids"]
    return EndOfTurn(marker, int(marker_ids[0]) if len(marker_ids) == 1 else None)


def stop_texts(tokenizer: Any) -> list[str]:
    """The end-of-turn text generation has to stop on, when the vocabulary spells it in several tokens
    (ChatML's <|im_end|> on Gemma's): [] when it is one token (a stop id) or there is none."""
    end = end_of_turn(tokenizer)
    return [end.text] if end is not None and end.token_id is None else []


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
