"""An Ollama Modelfile for an exported GGUF: FROM, a Go-template TEMPLATE, stop tokens, SYSTEM; or, for a
GGUF LoRA adapter, FROM the base and ADAPTER the file.

Ollama does not run a model's Jinja chat template; it needs the same format rewritten as a Go template
over `.Messages`. We recognise the four chat formats fine-tunes use (by the marker tokens in the Jinja
text) and write the matching Go template; an unrecognised template is refused rather than guessed, since
a wrong template makes a fine-tuned chat model answer badly without any error.

Each Go template ends by opening an assistant turn, like `add_generation_prompt=True`. No BOS is written:
llama.cpp adds it from the GGUF's `tokenizer.ggml.add_bos_token`. The stop parameters are the tokens that
close a turn (and the token that would open the next one, for models that run on past their end-of-turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loratool.errors import LoratoolError

MODELFILE = "Modelfile"


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]  # all present in a Jinja template of this format
    template: str  # Go template for Ollama
    stops: tuple[str, ...]


CHATML = ChatFormat(
    "chatml",
    ("<|im_start|>", "<|im_end|>"),
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
    ("<|im_end|>", "<|im_start|>"),
)
LLAMA3 = ChatFormat(
    "llama3",
    ("<|start_header_id|>", "<|eot_id|>"),
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    ("<|eot_id|>", "<|start_header_id|>"),
)
# Llama 2 / Mistral: the system prompt goes before the first user message, inside its [INST] block.
INST = ChatFormat(
    "llama2-mistral-inst",
    ("[INST]", "[/INST]"),
    "{{- $system := .System }}{{- range $i, $m := .Messages }}"
    '{{- if eq $m.Role "user" }}[INST] {{ if and $system (eq $i 0) }}{{ $system }}\n\n{{ end }}'
    "{{ $m.Content }} [/INST]"
    '{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{ end }}{{ end }}',
    ("[INST]", "</s>"),
)
ZEPHYR = ChatFormat(
    "zephyr",
    ("<|user|>", "<|assistant|>"),
    "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}<|assistant|>\n",
    ("</s>", "<|user|>"),
)
FORMATS = (CHATML, LLAMA3, INST, ZEPHYR)


def detect_chat_format(chat_template: str | None) -> ChatFormat | None:
    """The format whose markers all appear in the Jinja template; None without a template; refuses an
    unknown one."""
    if not chat_template:
        return None
    for fmt in FORMATS:
        if all(marker in chat_template for marker in fmt.markers):
            return fmt
    raise LoratoolError(
        "--ollama: the model's chat template is none of the formats loratool can translate for Ollama "
        f"({', '.join(f.name for f in FORMATS)})",
        hint="drop --ollama and write the Modelfile's TEMPLATE by hand (the GGUF itself carries the Jinja "
        "template, which llama.cpp uses)",
    )


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system message the Jinja template writes when a conversation has none (SmolLM2's and Qwen2.5's
    do). The model was trained and evaluated with it, so the Modelfile must pass it as SYSTEM: Ollama's Go
    template only sees the messages it is given.

    Found by rendering [user] and [system=SENTINEL, user]: if the first is the second with the sentinel
    replaced by some text, that text is the default."""
    if not chat_template:
        return None
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # The settings transformers renders chat templates with.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    sentinel, user = "\x00SYSTEM\x00", {"role": "user", "content": "hello"}
    try:
        template = env.from_string(chat_template)
        plain = template.render(messages=[user], add_generation_prompt=False, bos_token="", eos_token="")
        marked = template.render(
            messages=[{"role": "system", "content": sentinel}, user],
            add_generation_prompt=False,
            bos_token="",
            eos_token="",
        )
    except TemplateError:
        return None  # a template that refuses system messages has no default one either
    if marked.count(sentinel) != 1:
        return None
    before, after = marked.split(sentinel)
    if len(plain) <= len(before) + len(after) or not (plain.startswith(before) and plain.endswith(after)):
        return None
    return plain[len(before) : len(plain) - len(after)] or None


def modelfile_text(gguf_name: str, chat_template: str | None, system: str | None, eos: str | None) -> str:
    """The Modelfile for `gguf_name` (a file in the same directory)."""
    fmt = detect_chat_format(chat_template)
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt is None:  # a base model: the prompt is passed through as it is
        lines.append('TEMPLATE """{{ .Prompt }}"""')
        stops: list[str] = [eos] if eos else []
    else:
        lines.append(f"# chat format: {fmt.name} (translated from the model's Jinja chat template)")
        lines.append(f'TEMPLATE """{fmt.template}"""')
        stops = list(fmt.stops)
        if eos and eos not in stops:
            stops.append(eos)
    lines.append("")
    lines.extend(f'PARAMETER stop "{_escape(s)}"' for s in stops)
    if system:
        lines += ["", f'SYSTEM """{system}"""']
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def write_modelfile(
    folder: Path, gguf_name: str, chat_template: str | None, system: str | None, eos: str | None
) -> Path:
    if system and '"""' in system:
        raise LoratoolError(
            '--ollama: the system prompt contains \'"""\', which a Modelfile cannot quote',
            hint="change the recipe's system_prompt, or drop --ollama",
        )
    path = folder / MODELFILE
    partial = folder / f".{MODELFILE}.partial"
    partial.write_text(modelfile_text(gguf_name, chat_template, system, eos))
    partial.replace(path)
    return path


def adapter_modelfile_text(base: str, adapter_file: str) -> str:
    """The Modelfile for a GGUF LoRA adapter `adapter_file` (in the same directory) on `base`. The template
    and stops come from the base model Ollama builds FROM."""
    return (
        "# FROM must be the base model in GGUF form, with the weights the adapter was trained on: the file\n"
        "# `loratool export BASE --format gguf` writes (FROM ./BASE.f16.gguf) or an Ollama model of it.\n"
        f"FROM {base}\n"
        f"ADAPTER ./{adapter_file}\n"
    )


def write_adapter_modelfile(folder: Path, base: str, adapter_file: str) -> Path:
    path = folder / MODELFILE
    path.write_text(adapter_modelfile_text(base, adapter_file))
    return path
