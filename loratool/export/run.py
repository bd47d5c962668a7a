"""`loratool export`: put a model where it runs — a GGUF file for llama.cpp / Ollama, or a merged HF checkpoint.

Reads top to bottom like the export:

- SOURCE is a model directory (config.json + safetensors: a `loratool merge` output or any HF checkpoint),
  or a `loratool train` run directory / PEFT adapter directory (adapter_config.json + weights).
- `--format hf` is `loratool merge` for a run directory (run_merge streams, verifies and writes the
  checkpoint and merge.json); a model directory already is one, so that is refused.
- `--format gguf` writes a directory (default `SOURCE-gguf/` next to SOURCE) holding
  `<name>.<outtype>.gguf`, `export.json` and, with `--ollama`, a `Modelfile`. A run directory is first
  merged with run_merge into a temporary directory inside the output's parent (verified like `loratool
  merge`, in float32 for `--outtype f32`, else in the base's dtype), converted, and the temporary merge is
  deleted: what is kept is the GGUF; export.json records the merge (its merge.json). Run `--format hf`
  to keep the merged checkpoint as well.
- `--format gguf-lora` (a run directory only) writes the adapter alone as a GGUF LoRA file
  (export/gguf_lora.py), `<name>.lora.<f16|f32>.gguf`, with export.json and a Modelfile (FROM the base,
  ADAPTER the file) into `SOURCE-gguf-lora/`; nothing is merged, and the base's config.json gives the
  architecture and the tensor layout. As for a merge, the base must have the weights the run trained on
  (run.json's fingerprint) and a checkpoint must be sealed, unless --force; export.json's source.base
  records the check.
- The architecture is checked first, on the base's config.json for a run (merging a 7B takes minutes):
  an architecture the GGUF writer does not support is refused before any merge work. Errors from the
  conversion of a temporary merge name the run, never that folder (it is deleted by then).
- Everything is written into `<output>.partial-XXXX` and renamed into place at the end (rundir/outputs.py
  `Output.place`, export.json last: export/record.py), so an interrupted export leaves no directory that
  looks complete. The free disk space is checked before anything is written
  (the temporary merge plus the GGUF). An existing output is replaced only with --overwrite, and only if it
  is a loratool export (it has export.json).
- Verification (default on): the GGUF is loaded back with transformers and compared with the checkpoint it
  came from (logits and tokenizer; export/verify.py). A failed export is kept as
  `<output>.failed-verification` and the command fails.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool import __version__
from loratool.adapter.files import ADAPTER_CONFIG, read_adapter
from loratool.errors import LoratoolError
from loratool.export.gguf import ARCHITECTURES, BYTES_PER_WEIGHT, file_type, write_gguf
from loratool.export.gguf_lora import check_outtype, write_gguf_lora
from loratool.export.ollama import default_system_prompt, write_adapter_modelfile, write_modelfile
from loratool.export.record import RECORD, ExportRecord, ExportSource
from loratool.export.verify import verification_message, verify_gguf
from loratool.merge import check_base_identity, check_checkpoint, resolve_base, run_merge
from loratool.merge.record import MergeRecord
from loratool.model.checkpoint import DTYPES, open_checkpoint, read_config
from loratool.model.fingerprint import file_sha256
from loratool.rundir.outputs import Output, check_free_space, claim_output, library_versions, read_json
from loratool.rundir.records import (
    find_adapter,
    has_run_record,
    read_run,
    read_training_run,
    run_of_checkpoint,
)

if TYPE_CHECKING:
    from loratool.recipe import Recipe

EXPORT_RECORD = RECORD  # the name the package exported it by
FORMATS = ("gguf", "gguf-lora", "hf")


def run_export(
    source: str | Path,
    *,
    format: str = "gguf",
    outtype: str = "f16",
    output: str | Path | None = None,
    ollama: bool = False,
    base: str | None = None,
    verify: bool = True,
    force: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Export `source`; return the output directory."""

    started = time.time()
    source = find_source(Path(source))
    is_run = source_kind(source) == "run"
    check_options(format, ollama, base, force, is_run, source)
    if format != "hf":
        refuse_reward_model(source, is_run)
    if format == "hf":
        return run_merge(
            source, base=base, output=output, verify=verify, force=force, overwrite=overwrite, log=log
        )
    if format == "gguf-lora":
        return export_gguf_lora(source, base, outtype, output, force, overwrite, started, log)

    file_type(outtype)  # refuse an unknown outtype before any work
    check_gguf_architecture(source, base, is_run)  # before the merge, which takes minutes on a 7B
    output = output_location(output, source)
    record = write_export(
        output,
        overwrite,
        log,
        lambda partial: gguf_export(
            partial, source, base, outtype, ollama, verify, force, is_run, started, log
        ),
    )
    log(f"exported to {output / str(record.file)} ({record.wall_time_s:.0f}s)")
    return output


# --- the source ----------------------------------------------------------------------------------------


def find_source(path: Path) -> Path:
    path = path.expanduser().resolve()
    if not path.exists():
        raise LoratoolError(
            f"source not found: {path}",
            hint="pass a merged model directory (config.json + *.safetensors) or a `loratool train` run "
            "directory",
        )
    if not path.is_dir():
        raise LoratoolError(
            f"{path} is a file; SOURCE must be a directory",
            hint="pass the model directory that holds config.json and the *.safetensors weights, or a "
            "`loratool train` run directory",
        )
    return path


def source_kind(path: Path) -> str:
    """`run` for a training run / adapter directory, `model` for an HF checkpoint; refuses anything else."""

    if (path / ADAPTER_CONFIG).is_file() or has_run_record(path):
        return "run"
    if (path / "config.json").is_file():
        return "model"
    present = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    raise LoratoolError(
        f"{path} is neither a model directory (no config.json) nor a training run (no run.json or "
        f"{ADAPTER_CONFIG}); it has: {', '.join(present[:10]) or 'nothing'}",
        hint="pass the output_dir of `loratool train`, or a merged checkpoint from `loratool merge`",
    )


def check_options(
    format: str, ollama: bool, base: str | None, force: bool, is_run: bool, source: Path
) -> None:
    if format not in FORMATS:
        raise LoratoolError(f"--format must be one of {', '.join(FORMATS)}, not {format!r}")
    if ollama and format not in ("gguf", "gguf-lora"):
        raise LoratoolError("--ollama needs --format gguf", hint="Ollama runs GGUF files")
    if not is_run and (base or force):
        raise LoratoolError(
            f"--base and --force apply to run directories, and {source} is a model directory",
            hint="drop --base / --force (a model directory is exported as it is)",
        )
    if format == "hf" and not is_run:
        raise LoratoolError(
            f"{source} already is a Hugging Face checkpoint; --format hf merges a training run into one",
            hint="pass a `loratool train` run directory, or use --format gguf",
        )
    if format == "gguf-lora" and not is_run:
        raise LoratoolError(
            f"{source} is a model directory; --format gguf-lora writes a training run's LoRA adapter",
            hint="pass the `loratool train` run directory (the adapter), not its merged checkpoint; or "
            "export a merged model with --format gguf",
        )


def refuse_reward_model(source: Path, is_run: bool) -> None:
    """A reward model scores text with a classification head; GGUF holds language models that generate, so
    llama.cpp has nothing to run it with. Refused before any merge work."""
    if is_run:
        adapter_config = find_adapter(source) / ADAPTER_CONFIG
        scores = read_json(adapter_config).get("task_type") == "SEQ_CLS"
    else:
        architectures = read_json(source / "config.json").get("architectures") or []
        scores = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    if scores:
        raise LoratoolError(
            f"{source} is a reward model (a score head on the base, sequence classification); GGUF holds "
            "language models that generate, and llama.cpp cannot run a score head",
            hint="`loratool export SOURCE --format hf` (or `loratool merge`) writes the scoring checkpoint, "
            "which loads with transformers' AutoModelForSequenceClassification",
        )


# --- the output ----------------------------------------------------------------------------------------


def output_location(output: str | Path | None, source: Path, suffix: str = "gguf") -> Path:
    """The output directory (default SOURCE-gguf, or SOURCE-gguf-lora, next to SOURCE; for a checkpoint
    RUN-checkpoint-N-gguf next to RUN, outside the checkpoints save_total_limit rotates away), never inside
    or over the source. What may already be there is checked by outputs.check_output."""
    run_dir = run_of_checkpoint(source)  # RUN/checkpoints/checkpoint-N
    beside = run_dir.with_name(f"{run_dir.name}-{source.name}") if run_dir is not None else source
    path = Path(output).expanduser().absolute() if output else beside.with_name(f"{beside.name}-{suffix}")
    if path.suffix == ".gguf":
        raise LoratoolError(
            f"--output {path}: give a directory; the GGUF file is named <name>.<outtype>.gguf inside it, next "
            f"to {RECORD}",
            hint=f"e.g. --output {path.with_suffix('')}",
        )
    resolved = path.resolve()
    if resolved == source or resolved in source.parents or source in resolved.parents:
        raise LoratoolError(
            f"--output {path} would overlap the source {source}",
            hint="choose a directory outside the source, e.g. the default (SOURCE-gguf next to it)",
        )
    return path


def model_name(source: Path) -> str:
    """The model's name (GGUF general.name, file name): a merge output called `merged` takes its run's."""
    if source.name == "merged" and MergeRecord.read(source) is not None:
        return source.parent.name
    return source.name


def gguf_name(source: Path, outtype: str) -> str:
    return f"{model_name(source)}.{outtype}.gguf"


def check_disk_space(folder: Path, source: Path, base: str | None, outtype: str, is_run: bool) -> None:
    """Refuse early when the GGUF (and, for a run, the temporary merge) cannot fit."""

    model_dir = _base_dir(source, base) if is_run else source
    tensors = [t for shard in open_checkpoint(model_dir).shards for t in shard.tensors]
    params = sum(t.nbytes // max(1, _element_bytes(t.dtype)) for t in tensors)
    stored = sum(t.nbytes for t in tensors)

    bytes_per_param = BYTES_PER_WEIGHT[outtype]
    needed = params * bytes_per_param + 2 * 2**20 * 16  # tokenizer metadata: a few MB even for 128K vocabs
    if is_run:
        needed += params * 4 if outtype == "f32" else stored  # the temporary merge, in its dtype
    check_free_space(
        folder.parent,
        needed,
        what="the export",
        detail=" (merge + GGUF)" if is_run else "",
        hint="free some space, choose another --output, or a smaller --outtype (q8_0)",
    )


def check_gguf_architecture(source: Path, base: str | None, is_run: bool) -> None:
    """Refuse a model whose architecture the GGUF writer does not support (export/gguf.py ARCHITECTURES),
    reading config.json only: the source's, or for a run its base's."""

    model_dir = _base_dir(source, base) if is_run else source
    try:
        config = read_config(model_dir)
    except LoratoolError:
        return  # missing or unreadable here: the conversion reports it with its own message
    model_type = config.get("model_type")
    if model_type in ARCHITECTURES:
        return
    architectures = ", ".join(config.get("architectures") or []) or "none listed"
    where = f"{source}: its base {model_dir}" if is_run else str(model_dir)
    raise LoratoolError(
        f"{where}: model_type {model_type!r} cannot be exported to GGUF by loratool (config.json "
        f"architectures: {architectures})" + ("; nothing was merged" if is_run else ""),
        hint=f"supported model types: {', '.join(ARCHITECTURES)}; `loratool export --format hf` writes "
        "the merged Hugging Face checkpoint for any architecture",
    )


def _element_bytes(dtype: str) -> int:

    return DTYPES[dtype][1]


def _base_dir(run_dir: Path, base: str | None) -> Path:

    adapter_dir = find_adapter(run_dir)
    return resolve_base(base, read_training_run(adapter_dir), read_adapter(adapter_dir))[1]


# --- merge, convert, verify ----------------------------------------------------------------------------


def merge_for_export(
    run_dir: Path,
    folder: Path,
    base: str | None,
    outtype: str,
    verify: bool,
    force: bool,
    log: Callable[[str], None],
) -> tuple[Path, MergeRecord | None]:
    """Merge the run's adapter into `folder/merged` (removed after conversion); return it and merge.json."""

    merged = run_merge(
        run_dir,
        base=base,
        output=folder / "merged",
        dtype="float32" if outtype == "f32" else "auto",
        verify=verify,
        force=force,
        log=log,
    )
    return merged, MergeRecord.read(merged)


def gguf_export(
    partial: Path,
    source: Path,
    base: str | None,
    outtype: str,
    ollama: bool,
    verify: bool,
    force: bool,
    is_run: bool,
    started: float,
    log: Callable[[str], None],
) -> ExportRecord:
    """`--format gguf` into `partial`: a run is merged there first (deleted after the conversion)."""
    check_disk_space(partial, source, base, outtype, is_run)
    if is_run:
        model_dir, merge_record = merge_for_export(source, partial, base, outtype, verify, force, log)
    else:
        # A `loratool merge` output: its merge.json is the chain back to the run (adapter, base).
        model_dir, merge_record = source, MergeRecord.read(source)
    try:
        record = export_gguf(model_dir, partial, source, outtype, ollama, verify, log)
    except LoratoolError as exc:
        if not is_run:
            raise
        # The temporary merge is deleted on the way out: name the run it came from instead.
        merged = f"the merge of {source}"
        raise LoratoolError(
            exc.message.replace(str(model_dir), merged),
            None if exc.hint is None else exc.hint.replace(str(model_dir), merged),
        ) from None
    if is_run:
        shutil.rmtree(model_dir)  # the temporary merge: see the module docstring
    return dataclasses.replace(
        record,
        source=dataclasses.replace(record.source, merge=merge_record),
        wall_time_s=round(time.time() - started, 2),
    )


def export_gguf(
    model_dir: Path,
    folder: Path,
    source: Path,
    outtype: str,
    ollama: bool,
    verify: bool,
    log: Callable[[str], None],
) -> ExportRecord:
    """Write the GGUF (+ Modelfile) into `folder`, verify it; return export.json's content (the merge
    behind it and the wall time are added by run_export)."""

    name = gguf_name(source, outtype)
    log(f"converting {model_dir} to GGUF ({outtype})")
    gguf_file = write_gguf(model_dir, folder / name, outtype, log=log, name=model_name(source))
    recipe = _recipe_of(source, log)
    modelfile = None
    if ollama:
        tokenizer = _tokenizer_config(model_dir)
        system = _system_prompt(recipe) or default_system_prompt(tokenizer["chat_template"])
        modelfile = write_modelfile(
            folder, name, tokenizer["chat_template"], system, tokenizer["eos_token"]
        ).name
    created_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    size, sha256 = gguf_file.stat().st_size, file_sha256(gguf_file)
    versions = library_versions("gguf", "torch", "transformers", "peft", "safetensors")
    verification: dict[str, Any] = {"skipped": True}
    if verify:
        log("verifying the GGUF against its source (transformers gguf_file= reload)")
        verification = verify_gguf(gguf_file, model_dir, outtype, recipe, log)
    return ExportRecord(
        status="complete",
        loratool_version=__version__,
        created_at=created_at,
        source=ExportSource(path=str(source), kind=source_kind(source)),
        format="gguf",
        outtype=outtype,
        file=name,
        bytes=size,
        sha256=sha256,
        modelfile=modelfile,
        versions=versions,
        verification=verification,
    )


def export_gguf_lora(
    run_dir: Path,
    base: str | None,
    outtype: str,
    output: str | Path | None,
    force: bool,
    overwrite: bool,
    started: float,
    log: Callable[[str], None],
) -> Path:
    """`--format gguf-lora`: the run's adapter as `<name>.lora.<outtype>.gguf` + a Modelfile (FROM the base,
    ADAPTER the file) + export.json. Nothing is merged; the base's config.json names the architecture."""

    check_outtype(outtype)
    check_gguf_architecture(run_dir, base, is_run=True)
    adapter_dir = find_adapter(run_dir)
    run = read_training_run(adapter_dir)
    base_name, base_dir = resolve_base(base, run, read_adapter(adapter_dir))
    # As merge does: a checkpoint must be sealed, and the base must be the weights the run trained on
    # (llama.cpp would apply the adapter to any base of the same shape without a word).
    check_checkpoint(run, force=force, log=log)
    identity = check_base_identity(run, base_name, base_dir, force=force, log=log)
    output = output_location(output, run_dir, "gguf-lora")
    name = f"{model_name(run_dir)}.lora.{outtype}.gguf"

    def write(partial: Path) -> ExportRecord:
        log(f"converting the adapter {adapter_dir} to a GGUF LoRA ({outtype}) for {base_name}")
        gguf_file = write_gguf_lora(
            adapter_dir, base_dir, partial / name, outtype, log, name=model_name(run_dir)
        )
        modelfile = write_adapter_modelfile(partial, base_name, name)
        return ExportRecord(
            status="complete",
            loratool_version=__version__,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            source=ExportSource(path=str(run_dir), kind="run", base={"name": base_name, **identity}),
            format="gguf-lora",
            outtype=outtype,
            file=name,
            bytes=gguf_file.stat().st_size,
            sha256=file_sha256(gguf_file),
            modelfile=modelfile.name,
            versions=library_versions("gguf", "torch", "peft", "safetensors"),
            # No transformers reload exists for a GGUF LoRA file: llama.cpp applies it to the base at load.
            verification={"skipped": True, "reason": "no transformers reload of a GGUF LoRA file"},
            wall_time_s=round(time.time() - started, 2),
        )

    record = write_export(output, overwrite, log, write)
    log(f"exported to {output / name} ({record.wall_time_s:.0f}s)")
    return output


def _tokenizer_config(model_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return {"chat_template": tokenizer.chat_template, "eos_token": tokenizer.eos_token}


def _recipe_of(source: Path, log: Callable[[str], None]) -> Recipe | None:
    """The training recipe behind the source: the run's recipe.yaml, or for a `loratool merge` output the
    recipe.yaml of the adapter its merge.json names (validated; `log` says when it no longer validates)."""
    run = read_run(source)
    merge = MergeRecord.read(source)
    if run is None and merge is not None:
        adapter = merge.adapter.path
        run = read_run(Path(adapter)) if adapter and Path(adapter).is_dir() else None
    return run.recipe(log) if run is not None else None


def _system_prompt(recipe: Recipe | None) -> str | None:
    """The recipe's system prompt when its training sources agree on one (Modelfile SYSTEM)."""
    prompts = {s.system_prompt for s in recipe.data.train} if recipe is not None else set()
    return prompts.pop() if len(prompts) == 1 else None


def write_export(
    output: Path, overwrite: bool, log: Callable[[str], None], write: Callable[[Path], ExportRecord]
) -> ExportRecord:
    """Claim `output`, let `write` fill its partial directory and return export.json's content, then move
    it into place (`finish`); whatever is left of the partial directory on the way out is removed."""
    with claim_output(output, kind="export", record_name=RECORD, overwrite=overwrite, log=log) as out:
        partial = out.partial()
        try:
            record = write(partial)
            finish(out, partial, record, log)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
    return record


def finish(out: Output, partial: Path, record: ExportRecord, log: Callable[[str], None]) -> None:
    """Write export.json and move the export into place — or keep a failed one under a name saying so."""
    verification = record.verification
    if not verification.get("skipped") and not verification["passed"]:
        failed = dataclasses.replace(record, status="failed-verification")
        kept = out.keep_failed(partial, failed.to_dict())
        raise LoratoolError(
            verification_message(verification, kept),
            hint="rerun with LORATOOL_DEBUG=1 and report a bug; --no-verify skips the check (not advised)",
        )
    out.place(partial, record.to_dict(), log)
