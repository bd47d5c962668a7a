"""What a server answers with: one base and the adapters on it, each under its name, and the rules for
adding and removing adapters while it runs.

RUN arguments are resolved as `loratool generate` resolves TARGET and `--adapter`: the first is what is
loaded (a run directory, a merged model or a base model), every other one is an adapter on its base, named
after its directory; a directory that holds runs stands for all of them (a sweep's output, say). The base
answers under its own name (its hub id or directory name; a merged model under its run's name) and as
`base`. Loading reuses loratool.generate: each adapter keeps the chat template and system prompt it was
trained with, and its base is checked (weights fingerprint, tensor shapes) before it is put on the model.

The built-in engine mixes adapters in one batch, which PEFT does for LoRA only: other methods, DoRA and
trained bias terms are refused here with the reason, as is a rank above the server's limit. An adapter
loaded at run time must lie inside the directory the server was given (`--adapter-dir`), symbolic links
resolved: a request can name no other file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.adapter.files import check_adapter_files
from loratool.errors import LoratoolError
from loratool.generate.run import (
    BASE,
    Adapters,
    Prompting,
    check_adapter_base,
    load_adapters,
    parse_adapter_options,
    plain_name,
)
from loratool.generate.target import Target, resolve_target
from loratool.rundir.records import find_adapter, has_run_record, read_run
from loratool.serve.http_errors import ApiError

NAME = re.compile(r"[A-Za-z0-9_.\-]+")
DEFAULT_MAX_RANK = 64  # the built-in engine's default --max-lora-rank (an adapter's cost grows with r)


# --- RUN arguments --------------------------------------------------------------------------------------------


def resolve_runs(
    paths: list[Path], adapters: list[str], log: Callable[[str], None]
) -> tuple[Target, list[tuple[str, Path]]]:
    """The target to load and the other adapters as (name, directory): RUN arguments first (a directory of
    runs expanded to its finished runs, in name order), then `--adapter [NAME=]DIR` options."""
    expanded = [run for path in paths for run in _runs_in(Path(path), log)]
    if not expanded:
        raise LoratoolError(
            "nothing to serve",
            hint="pass a run directory, several, or a directory that holds runs (and --adapter NAME=DIR)",
        )
    target = resolve_target(expanded[0])
    options = [f"{run.name}={run}" for run in expanded[1:]] + list(adapters)
    return target, parse_adapter_options(options, target)


def _runs_in(path: Path, log: Callable[[str], None]) -> list[Path]:
    """`path` itself, or the finished runs a directory of runs holds."""
    path = path.expanduser()
    if not path.is_dir() or has_run_record(path) or (path / "config.json").is_file():
        return [path]
    if (path / "adapter_config.json").is_file() or (path / "merge.json").is_file():
        return [path]
    runs = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and has_run_record(p)):
        record = read_run(child)
        if record is not None and record.complete:
            runs.append(child)
        else:
            status = record.status if record is not None else "not loratool's"
            log(f"note: skipping {child}: its run.json says {status!r}")
    return runs or [path]  # no runs inside: resolve_target says what the directory is not


def base_name(target: Target, plain: str) -> str:
    """The name the base answers under: its hub id, or its directory's (a .gguf file's) name; a merged model
    answers under its run's name, as in `loratool generate`."""
    if target.kind == "merged":
        return plain
    if target.kind == "base":
        return target.name  # a hub id TARGET: that id, not its cache snapshot's commit hash
    source = str(target.recipe.base_model) if target.kind == "run" and target.recipe else str(target.path)
    local = Path(source).expanduser()
    if local.exists():
        return local.stem if local.is_file() else local.name
    return source


# --- what the built-in engine can batch ----------------------------------------------------------------------


def builtin_problems(adapter_dir: Path, max_rank: int) -> list[str]:
    """Why the built-in engine would refuse the adapter in `adapter_dir` (empty: it serves it)."""
    config = check_adapter_files(adapter_dir)
    merge = "merge it (`loratool merge`) and serve the merged model"
    problems = []
    kind = config.get("peft_type")
    if kind != "LORA":
        problems.append(f"it is a {kind} adapter: PEFT mixes adapters in one batch for LoRA only; {merge}")
    if config.get("use_dora"):
        problems.append(f"DoRA (use_dora): PEFT cannot mix DoRA adapters in one batch; {merge}")
    if config.get("bias", "none") != "none":
        problems.append(
            f"bias={config['bias']!r}: it trained the base's bias terms, which every other adapter and the base "
            f"would then answer with; {merge}"
        )
    if config.get("alora_invocation_tokens"):
        problems.append(
            f"it is an activated LoRA (alora_invocation_tokens), which the engine does not batch; {merge}"
        )
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    top = max((r for r in ranks if isinstance(r, int)), default=None)
    if top is not None and top > max_rank:
        problems.append(f"rank {top} is above this server's limit of {max_rank} (--max-lora-rank)")
    return problems + init_problems(adapter_dir)


def init_problems(adapter_dir: Path) -> list[str]:
    """An adapter its run says fits no original base (a LoftQ init: it was trained on a quantized and
    dequantized base), which any engine would answer wrongly with; or a reward model's, which answers
    nothing."""
    record = read_run(adapter_dir)
    if record is not None and record.stage == "reward":
        return ["it is a reward model (a score head): it scores answers and writes none"]
    init = record.adapter_init if record is not None else {}
    if init.get("mergeable") is False:
        return [
            f"it was trained with a {init.get('method')} init and fits no original base: {init.get('reason')}"
        ]
    return []


def refuse_unservable(name: str, adapter_dir: Path, max_rank: int) -> None:
    problems = builtin_problems(adapter_dir, max_rank)
    if problems:
        raise LoratoolError(
            f"adapter {name} ({adapter_dir}) cannot be served by the built-in engine: " + "; ".join(problems),
            hint="leave it out, or follow the reason above",
        )


# --- the served models ---------------------------------------------------------------------------------------


@dataclass
class Served:
    """The loaded base and its adapters, by the names requests use."""

    target: Target
    adapters: Adapters  # loratool.generate's: the model, the PEFT adapters and how each is prompted
    base_name: str
    max_rank: int
    adapter_dir: Path | None = None  # where adapters loaded at run time must lie; None: no loading
    dirs: dict[str, Path] = field(default_factory=dict)  # adapter name -> its directory
    created: dict[str, int] = field(default_factory=dict)  # model name -> when it was loaded (unix seconds)
    retiring: set[str] = field(default_factory=set)  # being unloaded: no longer given to requests

    @property
    def names(self) -> list[str]:
        """Every model a request may name, the base first."""
        return [self.base_name, *(n for n in self.adapters.names if n not in self.retiring)]

    def resolve(self, model: str) -> str:
        """The PEFT adapter (or BASE) a request's `model` names; 404 for anything else."""
        if model in (self.base_name, BASE):
            return BASE
        if model in self.adapters.names and model not in self.retiring:
            return model
        raise ApiError(
            404,
            f"The model `{model}` does not exist: this server serves {', '.join(self.names)}",
            param="model",
            code="model_not_found",
        )

    def prompting(self, name: str) -> Prompting:
        return self.adapters.prompting_of(name)

    def root_of(self, model: str) -> str:
        name = self.resolve(model)
        if name == BASE and self.target.kind == "run" and self.target.recipe is not None:
            return str(self.target.recipe.base_model)
        return str(self.dirs.get(name, self.target.path))

    # --- run time: load and unload ---------------------------------------------------------------------------

    def check_new(self, name: str, lora_path: str) -> Path:
        """The adapter directory a load request names, checked: inside --adapter-dir, a name not taken, a
        method and rank the engine serves, trained on this base. Raises ApiError (403 or 400)."""
        if self.adapter_dir is None:
            raise ApiError(
                403,
                "loading adapters at run time is off: start the server with --adapter-dir DIR to load adapters "
                "from DIR",
                code="runtime_loading_off",
            )
        if not NAME.fullmatch(name or ""):
            raise ApiError(
                400, f"lora_name {name!r}: use letters, digits, '.', '_' and '-' only", param="lora_name"
            )
        if name in (BASE, self.base_name) or name in self.adapters.names:
            raise ApiError(400, f"lora_name {name!r} is already taken (serving {', '.join(self.names)})",
                           param="lora_name", code="name_taken")  # fmt: skip
        root = self.adapter_dir.resolve()
        path = Path(lora_path).expanduser()
        path = (path if path.is_absolute() else root / path).resolve()
        if not path.is_relative_to(root):
            raise ApiError(400, f"lora_path {lora_path!r} is outside this server's adapter directory {root}",
                           param="lora_path", code="outside_adapter_dir")  # fmt: skip
        try:
            adapter_dir = find_adapter(path)
        except LoratoolError as exc:
            raise ApiError(400, f"lora_path {lora_path!r}: {exc.message}", param="lora_path") from None
        outside = [p.name for p in adapter_dir.iterdir() if not p.resolve().is_relative_to(root)]
        if outside:
            raise ApiError(400, f"lora_path {lora_path!r}: {', '.join(sorted(outside))} link outside this "
                           f"server's adapter directory {root}", param="lora_path",
                           code="outside_adapter_dir")  # fmt: skip
        problems = builtin_problems(adapter_dir, self.max_rank)
        if problems:
            raise ApiError(400, f"adapter {name} ({lora_path}) is refused: " + "; ".join(problems),
                           param="lora_path", code="adapter_refused")  # fmt: skip
        try:
            check_adapter_base(name, adapter_dir, self.target, self.adapters.loaded)
        except LoratoolError as exc:
            raise ApiError(400, exc.message, param="lora_path", code="adapter_refused") from None
        return adapter_dir

    def add(self, name: str, adapter_dir: Path) -> float:
        """Put the adapter on the model (on the engine's thread, between two steps); its load time in ms."""
        took = self.adapters.add(name, adapter_dir)  # prompted as `loratool generate --adapter` prompts it
        self.dirs[name] = adapter_dir
        self.created[name] = int(time.time())
        return took

    def remove(self, name: str) -> None:
        """Take the adapter off the model (on the engine's thread, once no request uses it)."""
        self.adapters.remove(name)
        for table in (self.dirs, self.created):
            table.pop(name, None)
        self.retiring.discard(name)


def load_served(
    target: Target,
    extra: list[tuple[str, Path]],
    *,
    max_rank: int,
    adapter_dir: Path | None,
    log: Callable[[str], None],
) -> Served:
    """Check every adapter, load the base and put them all on it (loratool.generate.load_adapters)."""
    own = [(target.adapter_name, target.path)] if target.kind == "run" else []
    for name, path in [*own, *extra]:
        if not NAME.fullmatch(name):
            raise LoratoolError(
                f"{path}: the name {name!r} may only hold letters, digits, '.', '_' and '-'",
                hint="rename the directory, or load it with --adapter NAME=DIR",
            )
        refuse_unservable(name, path, max_rank)
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise LoratoolError(f"--adapter-dir {adapter_dir}: no such directory",
                            hint="pass the directory that adapters may be loaded from")  # fmt: skip
    adapters = load_adapters(target, [f"{name}={path}" for name, path in extra], log)
    name = base_name(target, plain_name(target))
    if name in adapters.names:
        raise LoratoolError(
            f"the base answers as {name!r}, which is also an adapter's name",
            hint="load that adapter under another name: --adapter NAME=DIR",
        )
    for adapter in adapters.names:
        adapters.prompting_of(adapter)  # every tokenizer and template now, not on a first request
    adapters.prompting_of(BASE)
    now = int(time.time())
    dirs = {n: Path(p) for n, p in [*own, *extra]}
    return Served(
        target=target,
        adapters=adapters,
        base_name=name,
        max_rank=max_rank,
        adapter_dir=Path(adapter_dir) if adapter_dir is not None else None,
        dirs=dirs,
        created={n: now for n in [name, *adapters.names]},
    )


def generation_config_notes(model: Any) -> list[str]:
    """Settings of the model's generation_config that transformers' generate applies and the built-in
    engine does not (a repetition penalty, say): answers would then differ from `loratool generate`'s."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return []
    ignored = {
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "min_new_tokens": None,
        "min_length": 0,
        "bad_words_ids": None,
        "suppress_tokens": None,
        "begin_suppress_tokens": None,
        "forced_bos_token_id": None,
        "forced_eos_token_id": None,
        "encoder_repetition_penalty": 1.0,
    }
    notes = []
    for key, default in ignored.items():
        value = getattr(config, key, default)
        if value not in (default, None) and not (key == "min_length" and value == 0):
            notes.append(
                f"note: the model's generation_config sets {key}={value!r}, which the built-in engine does not "
                "apply (transformers' generate does)"
            )
    return notes
