"""`--engine vllm`: serve the adapters with vLLM's own OpenAI server, after checking each against vLLM's
LoRA loader, and `auto`'s choice between vLLM and the built-in engine.

vLLM is the engine for GPUs at scale (paged attention, its own multi-LoRA kernels); loratool does not
re-implement it. It builds the command vLLM needs — `vllm serve BASE --enable-lora --lora-modules NAME=DIR ...
--max-lora-rank R --max-loras N` — prints it and runs it in this process's place. Before that it checks what
vLLM would refuse after loading the base for minutes: the rules of loratool.rundir.model_card.vllm_problems
(LoRA only, no DoRA, no bias, no modules_to_save, one alpha / r scaling, rank within vLLM's largest
--max-lora-rank), target modules outside the layers vLLM puts LoRA on, and a rank above the --max-lora-rank
asked for. What vLLM does differently from the built-in engine is said as a note: it prompts every adapter
with one chat template and adds no trained system prompt.

The API key goes to vLLM in its environment (VLLM_API_KEY), never on the printed command line. Loading
adapters at run time (--adapter-dir) stays with the built-in engine, which confines it to that directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loratool.errors import LoratoolError
from loratool.generate.run import trained_system
from loratool.generate.target import Target
from loratool.model.gguf_base import is_gguf
from loratool.model.load import local_model_dir
from loratool.rundir.model_card import VLLM_RANKS, vllm_problems
from loratool.rundir.records import read_training_run
from loratool.serve.served import init_problems

# The layers vLLM puts LoRA on, by the Hugging Face module names adapters are saved with (vLLM packs q/k/v
# and gate/up itself): the decoder projections of the families loratool trains, the embeddings and LM head.
_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
_EMBEDDINGS = {"embed_tokens", "lm_head"}
VLLM_LORA_MODULES: dict[str, set[str]] = {
    **{
        family: _PROJECTIONS | _EMBEDDINGS
        for family in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text")
    },
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} | _EMBEDDINGS,
}


@dataclass
class VllmPlan:
    """What `--engine vllm` runs: the command, its extra environment, and notes for the user."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def shown(self) -> str:
        return shlex.join(self.command)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(asked: str, gpu: Callable[[], bool]) -> tuple[str, str]:
    """The engine to serve with and why, for --engine builtin|vllm|auto (`gpu()` says whether CUDA is there)."""
    if asked in ("builtin", "vllm"):
        return asked, "asked for with --engine"
    installed = vllm_installed()
    if installed and gpu():
        return "vllm", "auto: vLLM is installed and a CUDA GPU is present"
    why = "vLLM is not installed" if not installed else "no CUDA GPU is present"
    return "builtin", f"auto: {why}"


def vllm_refusals(
    adapters: dict[str, Path], model_type: str | None, max_rank: int | None
) -> dict[str, list[str]]:
    """Per adapter, why vLLM's LoRA loader would refuse it (adapters it takes are left out)."""
    refusals: dict[str, list[str]] = {}
    for name, folder in adapters.items():
        problems = vllm_problems(folder) + init_problems(folder)
        modules = _lora_modules(folder)
        allowed = VLLM_LORA_MODULES.get(model_type or "")
        odd = sorted(modules - allowed) if allowed is not None else []
        if odd:
            problems.append(
                f"LoRA on {', '.join(odd)}: vLLM puts LoRA on {', '.join(sorted(allowed))} of a {model_type}"
            )
        rank = _top_rank(folder)
        if max_rank is not None and rank is not None and rank > max_rank:
            problems.append(f"rank {rank} is above --max-lora-rank {max_rank}")
        if problems:
            refusals[name] = problems
    return refusals


def vllm_plan(
    target: Target,
    adapters: dict[str, Path],
    *,
    host: str,
    port: int,
    base_name: str,
    max_rank: int | None,
    api_key: str | None,
    log: Callable[[str], None],
) -> VllmPlan:
    """The checked vLLM command for TARGET's base and `adapters` (name -> directory)."""
    base, base_dir = _vllm_base(target, log)
    if is_gguf(base):
        raise LoratoolError(
            f"--engine vllm: the base {base} is a .gguf file, which loratool does not hand to vLLM",
            hint="serve it with --engine builtin, or train on the Hugging Face checkpoint of the same model",
        )
    if max_rank is not None and max_rank not in VLLM_RANKS:
        raise LoratoolError(f"--max-lora-rank {max_rank}: vLLM takes one of {', '.join(map(str, VLLM_RANKS))}",
                            hint="pick the smallest of those at or above your adapters' rank")  # fmt: skip
    model_type = _model_type(base_dir)
    refusals = vllm_refusals(adapters, model_type, max_rank)
    if refusals:
        lines = "; ".join(f"{name}: {', '.join(problems)}" for name, problems in refusals.items())
        raise LoratoolError(
            f"vLLM's LoRA loader would refuse {len(refusals)} of the adapters — {lines}",
            hint="serve them with --engine builtin, or merge each (`loratool merge`) and serve the merged model",
        )
    top = max((rank for folder in adapters.values() if (rank := _top_rank(folder)) is not None), default=1)
    rank = max_rank or next(r for r in VLLM_RANKS if r >= top)
    command = [_vllm_executable(), "serve", base, "--host", host, "--port", str(port),
               "--served-model-name", base_name]  # fmt: skip
    notes = []
    if adapters:
        command += ["--enable-lora", "--lora-modules", *(f"{n}={p.resolve()}" for n, p in adapters.items())]
        command += ["--max-lora-rank", str(rank), "--max-loras", str(len(adapters))]
        template, template_file = _chat_template_for(adapters, base_dir)
        if template_file is not None:
            command += ["--chat-template", str(template_file)]
        notes += _prompting_notes(adapters, template)
    if model_type is None:
        notes.append("note: the base's model type is unknown here, so its LoRA layers were not checked")
    env = {"VLLM_API_KEY": api_key} if api_key else {}
    return VllmPlan(command, env, notes)


def exec_vllm(plan: VllmPlan) -> None:
    """Replace this process with vLLM's server (its signals, logs and exit code are vLLM's own)."""
    if not vllm_installed() or shutil.which(plan.command[0]) is None:
        raise LoratoolError(
            "--engine vllm: vLLM is not installed here",
            hint=f"pip install 'loratool[vllm]' on a machine with a CUDA GPU, then run: {plan.shown}",
        )
    sys.stdout.flush()
    os.execvpe(plan.command[0], plan.command, {**os.environ, **plan.env})


def _vllm_executable() -> str:
    beside = Path(sys.executable).with_name("vllm")  # the vllm of this environment first
    return str(beside) if beside.is_file() else "vllm"


def _vllm_base(target: Target, log: Callable[[str], None]) -> tuple[str, Path | None]:
    """What `vllm serve` loads (a hub id or a path), and its local directory when there is one."""
    if target.kind == "run":
        assert target.recipe is not None
        base = str(target.recipe.base_model)
        local = Path(base).expanduser()
        found = (
            local_model_dir(base, target.recipe.model.revision, log) if not local.suffix == ".gguf" else None
        )
        return (str(local.resolve()) if local.exists() else base), found
    return str(target.path), target.path if target.path.is_dir() else None


def _model_type(base_dir: Path | None) -> str | None:
    try:
        return json.loads((base_dir / "config.json").read_text())["model_type"] if base_dir else None
    except (OSError, ValueError, KeyError):
        return None


def _lora_modules(folder: Path) -> set[str]:
    """The layer names (without their path) the adapter's LoRA tensors sit on."""
    from safetensors import safe_open

    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return set()
    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    return {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n}


def _top_rank(folder: Path) -> int | None:
    config = _config(folder)
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    return max((r for r in ranks if isinstance(r, int)), default=None)


def _config(folder: Path) -> dict:
    try:
        return json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return {}


def chat_template_of(folder: Path | None) -> str | None:
    """The chat template saved in a tokenizer directory (chat_template.jinja or tokenizer_config.json)."""
    if folder is None:
        return None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        return None
    return template if isinstance(template, str) else None


def _chat_template_for(adapters: dict[str, Path], base_dir: Path | None) -> tuple[str | None, Path | None]:
    """The template vLLM will prompt with, and the file to pass as --chat-template: the first adapter's
    own (saved with its run) when it differs from the base's, since vLLM uses one template for all."""
    base_template = chat_template_of(base_dir)
    first = next(iter(adapters.values()))
    own = chat_template_of(first)
    if own is not None and own != base_template and (first / "chat_template.jinja").is_file():
        return own, (first / "chat_template.jinja").resolve()
    return base_template, None


def _prompting_notes(adapters: dict[str, Path], template: str | None) -> list[str]:

    notes = []
    for name, folder in adapters.items():
        own = chat_template_of(folder)
        if own is not None and own != template:
            notes.append(f"note: vLLM prompts {name} with another chat template than the one it was trained "
                         "with (vLLM uses one for every adapter); the built-in engine uses each adapter's own")  # fmt: skip
        recipe = read_training_run(folder).recipe
        system = trained_system([s.system_prompt for s in recipe.data.train]) if recipe is not None else None
        if system:
            notes.append(f"note: {name} was trained with a system prompt that vLLM does not add: send it as the "
                         f"first message ({system[:60]!r})")  # fmt: skip
    return notes
