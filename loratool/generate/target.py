"""What `eval`, `generate` and `chat` point at (TARGET), and how it is loaded.

A TARGET is one of three things, told apart by the file that describes it:

    run      a finished `loratool train` run directory (run.json + recipe.yaml + the adapter): the base
             is loaded as training loaded it (loratool.model.load.load_model: same dtype, same 4-bit
             quantization) and the adapter is put on top with PEFT, so the base can be switched off
             (`disable_adapter()`) for a side-by-side comparison without loading it twice.
    merged   a `loratool merge` output (merge.json): a plain checkpoint; merge.json names the base it was
             merged into and the adapter (and so the run, its data and its loss curve) it came from.
    base     any Hugging Face model directory (config.json + safetensors), or a local .gguf file (loaded
             from its cached conversion, loratool.model.gguf_base).

A TARGET that is no local path but reads as a hub id (`org/name`) is its snapshot in the local Hugging
Face cache; nothing is downloaded here. It keeps the hub id as its name (`Target.name`): the snapshot's
directory is named after a commit hash, which says nothing to the user.

Loading never unpickles (safetensors only) and runs remote code only when the run's recipe asked for it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from loratool.adapter.files import check_adapter_files
from loratool.data.templates import end_of_turn, stop_texts
from loratool.errors import LoratoolError
from loratool.merge.record import MergeRecord
from loratool.merge.run import default_output as merged_location
from loratool.model import hardware
from loratool.model.fingerprint import fingerprint_matches, fingerprint_scheme, weights_fingerprint
from loratool.model.gguf_base import is_gguf, resolve_base_model
from loratool.model.hardware import model_dtype
from loratool.model.load import (
    load_model,
    load_tokenizer,
    local_dir_has_only_pickles,
    local_model_dir,
    looks_like_local_path,
)
from loratool.progress import still_running
from loratool.recipe import ModelSection
from loratool.rundir.records import (
    ADAPTER_FILES,
    RECIPE,
    RunRecord,
    has_run_record,
    read_run,
    run_of_checkpoint,
)
from loratool.train.inputs import hub_cache, offline_mode

if TYPE_CHECKING:
    from loratool.recipe import Recipe

TargetKind = Literal["run", "merged", "base"]


@dataclass(frozen=True)
class Target:
    """A resolved TARGET: what it is, and what it says about its base, data and training."""

    kind: TargetKind
    path: Path
    recipe: Recipe | None = None  # the run's resolved recipe (a merged model: its run's, if still there)
    run: RunRecord | None = None  # run.json of the run (merged: of its run, when its recipe is there too)
    merge: MergeRecord | None = None  # merge.json of a merged target
    run_dir: Path | None = None  # the training run behind a run or merged target, when known
    hub_id: str | None = None  # the hub id TARGET was given as (`path` is then its cache snapshot)

    @property
    def name(self) -> str:
        """What the user calls TARGET: the hub id it was given as, else its directory's (a file's) name."""
        if self.hub_id:
            return self.hub_id
        return self.path.stem if self.path.is_file() else self.path.name

    @property
    def adapter_name(self) -> str:
        """The name the run's own adapter gets in PEFT (and in `--prompt "@name: ..."`)."""
        return self.path.name if self.kind == "run" else "default"

    @property
    def base_id(self) -> str:
        """How messages name the base model."""
        if self.kind == "run":
            assert self.run is not None and self.recipe is not None
            return str(self.run.base_model.id or self.recipe.base_model)
        if self.kind == "merged":
            return str((self.merge.base_model.id if self.merge is not None else None) or "?")
        return self.hub_id or str(self.path)

    @property
    def base_fingerprint(self) -> str | None:
        """Fingerprint of the weights extra adapters go on top of (the run's recorded base, or TARGET's)."""

        if self.kind == "run":
            assert self.run is not None
            return self.run.base_model.fingerprint
        return weights_fingerprint(model_dir(self, log=lambda _: None))

    def base_matches(self, recorded: str) -> bool:
        """Whether the weights extra adapters go on top of are the ones `recorded` (another run's record)
        describes; records of one scheme compare as they are, others against the weights themselves."""

        own = self.base_fingerprint
        if own and fingerprint_scheme(own) == fingerprint_scheme(recorded):
            return own == recorded
        if self.kind != "run":
            return fingerprint_matches(model_dir(self, log=lambda _: None), recorded)
        assert self.recipe is not None
        found = local_model_dir(self.recipe.base_model, self.recipe.model.revision, lambda _: None)
        return found is None or fingerprint_matches(found, recorded)  # not found: it cannot be loaded either


@dataclass
class Loaded:
    """A model ready to evaluate or generate with."""

    model: Any  # a PeftModel for run targets, else a PreTrainedModel
    tokenizer: Any
    device: str
    dtype: str
    context: int | None  # longest sequence the model handles (max_position_embeddings), None = unknown
    stop_ids: list[int]  # EOS and the chat template's end-of-turn token
    load_seconds: float
    quantized: bool = False
    stop_texts: list[str] = field(default_factory=list)  # an end of turn spelled in several tokens


def resolve_target(path: str | Path) -> Target:
    """Tell a run directory, a merged checkpoint and a base model directory apart; refuse anything else.
    A name that is no local path but reads as a hub id (`org/name`) is looked up in the Hugging Face cache."""
    given = str(path)
    path = Path(path).expanduser().resolve()
    if not path.exists() and not looks_like_local_path(given):
        return _cached_hub_target(given)
    if not path.exists():
        raise LoratoolError(
            f"TARGET not found: {path}",
            hint="pass a `loratool train` run directory, a `loratool merge` output, or a model directory",
        )
    if path.is_dir() and has_run_record(path):
        return _run_target(path)
    merge = MergeRecord.read(path) if path.is_dir() else None
    if merge is not None:
        return _merged_target(path, merge)
    if path.is_dir() and (path / "config.json").is_file():
        return Target("base", path)
    if path.is_file() and is_gguf(path):
        return Target("base", path)
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()) if path.is_dir() else []
    hint = (
        "pass a run directory (run.json), a merged checkpoint (merge.json) or a model directory (config.json)"
    )
    if (path / "adapter_config.json").is_file():
        hint = _bare_adapter_hint(path)
    raise LoratoolError(
        f"TARGET {path} is not a run directory, a merged checkpoint or a model directory"
        + (f" (it has: {', '.join(present[:12])})" if present else ""),
        hint=hint,
    )


def _cached_hub_target(name: str) -> Target:
    """TARGET given as a hub id: its snapshot in the local Hugging Face cache (never downloaded here)."""
    found = local_model_dir(name, None, log=lambda _: None)
    if found is not None:
        return dataclasses.replace(resolve_target(found), hub_id=name)
    offline = "; HF_HUB_OFFLINE is set" if offline_mode() else ""
    raise LoratoolError(
        f"TARGET {name!r} is not a local path, and as a hub id it is not in the local Hugging Face cache "
        f"({hub_cache()}{offline})",
        hint=f"download it once with network (`hf download {name}`; a gated model needs `hf auth login` "
        "first), or pass a local directory (a run, a merged model or a model directory)",
    )


def _bare_adapter_hint(path: Path) -> str:
    """How to use an adapter directory that is not a run: generate takes it with --adapter, eval merged."""
    run_dir = run_of_checkpoint(path)
    run = read_run(run_dir) if run_dir is not None else None
    base = (run.base_model.id if run is not None else None) or "BASE"
    merge_base = "" if run is not None else " --base BASE"
    return (
        f"an adapter alone is not a TARGET: `loratool generate {base} --adapter NAME={path}` puts it on its "
        f"base; to evaluate it, merge it first (`loratool merge --adapter {path}{merge_base}`) and evaluate "
        f"the merged model (`loratool eval {merged_location(path)} --data FILE`)"
    )


def model_dir(target: Target, log: Callable[[str], None]) -> Path:
    """The directory a merged or base target's weights load from (a .gguf file: its cached conversion)."""
    return Path(resolve_base_model(str(target.path), log))


def _run_target(path: Path) -> Target:

    record = read_run(path)
    if record is None:
        raise LoratoolError(
            f"{path} holds a run.json that loratool did not write (or an older loratool, without its marker)",
            hint=_bare_adapter_hint(path),
        )
    status = record.status
    if status != "complete":
        reason = f": {record.error}" if record.error else ""
        raise LoratoolError(
            f"the run in {path} is not finished (run.json status: {status!r}{reason})",
            hint="only a finished run has an adapter to evaluate: resume it with `loratool train RECIPE "
            "--resume`, or evaluate another run",
        )
    missing = [name for name in (*ADAPTER_FILES, RECIPE) if not (path / name).is_file()]
    if missing:
        raise LoratoolError(
            f"the run in {path} says it finished but {', '.join(missing)} is missing",
            hint="the directory was changed after training; train again or restore the files",
        )
    check_adapter_files(path)
    try:
        recipe = record.load_recipe()
    except LoratoolError as exc:
        raise LoratoolError(
            f"{path / 'recipe.yaml'} no longer validates: {exc.message}",
            hint="the run was written by another loratool version; evaluate its merged model with --data",
        ) from None
    return Target("run", path, recipe=recipe, run=record, run_dir=path)


def _merged_target(path: Path, merge: MergeRecord) -> Target:
    if not merge.complete:
        raise LoratoolError(
            f"the merge in {path} did not complete (merge.json status: {merge.status!r})",
            hint="run `loratool merge` again",
        )
    run_dir = Path(merge.adapter.path) if merge.adapter.path else None
    run_record = read_run(run_dir) if run_dir is not None and run_dir.is_dir() else None
    # Without a recipe that still validates, the run's data is unknown (--data is required) and so is
    # the rest of what the run says.
    recipe = run_record.recipe() if run_record is not None else None
    return Target(
        "merged",
        path,
        recipe=recipe,
        run=run_record if recipe is not None else None,
        merge=merge,
        run_dir=run_dir if run_dir is not None and run_dir.is_dir() else None,
    )


def merged_base_dir(target: Target) -> Path:
    """The base a merged model was merged into (for --compare-base)."""
    base = target.merge.base_model.path if target.merge is not None else None
    if not base or not Path(base).is_dir():
        raise LoratoolError(
            f"--compare-base: the base recorded in {target.path / 'merge.json'} ({base}) is not there anymore",
            hint="drop --compare-base, or evaluate the base directory on its own with the same --data",
        )
    return Path(base)


# --- loading ------------------------------------------------------------------------------------------


def is_reward_model(target: Target) -> bool:
    """A reward model: a `reward` run, or a checkpoint of a ForSequenceClassification class (a merged
    one). It scores answers and writes none."""
    if target.recipe is not None and target.recipe.reward is not None:
        return True
    config = target.path / "config.json"
    try:
        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def load_target(target: Target, log: Callable[[str], None]) -> Loaded:
    """The model (with its adapter, for a run) and the tokenizer that carries the chat template."""

    if is_reward_model(target):
        raise LoratoolError(
            f"{target.path} is a reward model (a score head): it scores answers and writes none",
            hint="`loratool eval RUN_DIR` ranks held-out pairs with it; to score your own answers, load it "
            "with transformers' AutoModelForSequenceClassification (its README.md shows how)",
        )
    started = time.perf_counter()
    hw = hardware.detect()
    with still_running(f"loading {target.name}", log) as log:  # a large base loads for minutes, silently
        if target.kind == "run":
            model, tokenizer, quantized = _load_run(target, hw, log)
        else:
            log(f"loading {target.path} on {hw.device}")
            source = model_dir(target, log)
            model, quantized = load_checkpoint(source, hw), False
            tokenizer = _load_tokenizer(source)
    model.eval()
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        device=hw.device,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        context=context_length(model),
        stop_ids=stop_ids_of(tokenizer, model),
        load_seconds=time.perf_counter() - started,
        quantized=quantized,
        stop_texts=stop_texts(tokenizer),
    )


def _load_run(target: Target, hw: Any, log: Callable[[str], None]) -> tuple[Any, Any, bool]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    recipe = target.recipe
    assert recipe is not None
    check_run_base(target, log)
    # The run's tokenizer: the chat template the data was rendered with during training.
    tokenizer = AutoTokenizer.from_pretrained(target.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    log(f"loading {target.base_id} on {hw.device} + the adapter in {target.path}")
    base = load_model(recipe, hw, log)  # as trained: dtype, 4-bit quantization, attention implementation
    if not recipe.is_quantized():
        base = base.to(hw.device)  # quantized weights are placed at load time (device_map)
    model = PeftModel.from_pretrained(base, target.path, adapter_name=target.adapter_name)
    return model, tokenizer, recipe.is_quantized()


def check_run_base(target: Target, log: Callable[[str], None]) -> None:
    """Refuse a base whose weights changed since training: the adapter would be evaluated on another model."""

    assert target.run is not None and target.recipe is not None
    recorded = target.run.base_model.fingerprint
    found = local_model_dir(target.recipe.base_model, target.recipe.model.revision, log)
    actual = weights_fingerprint(found) if found is not None else None
    if recorded and actual and not fingerprint_matches(found, recorded):
        raise LoratoolError(
            f"the base model {target.recipe.base_model} is not the one the run in {target.path} trained on: "
            f"run.json records fingerprint {recorded[:31]}…, the weights there now have {actual[:31]}…",
            hint="restore the base the run used (run.json base_model), or train again on this one",
        )


def load_checkpoint(path: Path, hw: Any) -> Any:
    """A plain checkpoint directory (merged model or base), in the dtype the hardware computes best in.

    The single place where eval/generate/chat load a model directory that is not a run's base (a .gguf
    TARGET arrives here as its conversion, see model_dir)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=model_dtype("auto", hw), use_safetensors=True
        )
    except (OSError, ValueError) as exc:
        if local_dir_has_only_pickles(str(path)):
            raise LoratoolError(
                f"{path} has weights only in pickle files (*.bin / *.pt), which loratool does not load",
                hint="convert the checkpoint once to safetensors (save_pretrained(dir, safe_serialization=True))",
            ) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoratoolError(
            f"cannot load the model in {path}: {first}",
            hint=f"check that {path} holds a Hugging Face causal LM (config.json, *.safetensors)",
        ) from None
    return model.to(hw.device)


def _load_tokenizer(path: Path) -> Any:

    return load_tokenizer(str(path), ModelSection())


def context_length(model: Any) -> int | None:
    config = model.config
    for source in (config, getattr(config, "text_config", None)):
        value = getattr(source, "max_position_embeddings", None) if source is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return None


def stop_ids_of(tokenizer: Any, model: Any) -> list[int]:
    """Where answers of a template end: the model's and the tokenizer's EOS, and the token the template
    closes an assistant turn with, when the vocabulary has it as one token (a chat fine-tune that stops only
    at EOS runs on; an end of turn in several tokens is a stop text: data.templates.stop_texts)."""

    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    end = end_of_turn(tokenizer)
    if end is not None and end.token_id is not None:
        ids.append(end.token_id)
    return list(dict.fromkeys(int(i) for i in ids))
