"""`loratool merge`: fold one LoRA adapter into its base model and write a standard HF checkpoint.

Reads top to bottom like the merge: find the adapter and what it says about its base, find the base and
check it is the one trained on, decide the output dtype and (for QLoRA) which base weights to fold into,
stream the base checkpoint shard by shard into `<output>.partial-XXXX` (model/checkpoint.py), add config,
generation config and tokenizer, verify against base + adapter (merge/verify.py), write merge.json
(merge/record.py), and only then rename the directory into place (rundir/outputs.py `Output.place`).
An interrupted merge leaves at most a `.partial-` directory; a merge that fails verification is kept as
`<output>.failed-verification`.

Memory: the adapter plus a few tensors of the base (see model/checkpoint.py), never a whole shard or model.
Verification, when on, loads the base and the merged model one after the other, in float32.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loratool import __version__
from loratool.adapter.files import (
    ADAPTER_CONFIG,
    Adapter,
    check_against_base,
    fold,
    read_adapter,
)
from loratool.adapter.inits import refuse_unmergeable
from loratool.data.templates import end_of_turn
from loratool.errors import LoratoolError
from loratool.merge import reward as reward_model
from loratool.merge.compare import build_probes
from loratool.merge.qlora import QuantizedBase, as_trained, quantization_device, quantized_weight_names
from loratool.merge.record import RECORD, MergedAdapter, MergedBase, MergeRecord
from loratool.merge.verify import EXACT, QUANTIZATION_DRIFT, ROUNDED, Reference, verify
from loratool.model.checkpoint import (
    FLOAT_DTYPES,
    INDEX,
    SAFETENSORS_DTYPE,
    Checkpoint,
    ShardWriter,
    TensorInfo,
    checkpoint_dtype,
    open_checkpoint,
    read_config,
    read_tensor,
    shard_bytes,
    torch_dtype,
)
from loratool.model.fingerprint import fingerprint_matches, weights_fingerprint
from loratool.model.hardware import Hardware, model_dtype
from loratool.model.load import local_model_dir
from loratool.recipe import QuantizationSection
from loratool.rundir.outputs import Output, check_free_space, claim_output, library_versions, read_json
from loratool.rundir.records import (
    RunDir,
    TrainingRun,
    find_adapter,
    read_training_run,
    run_of_checkpoint,
)

MERGE_RECORD = RECORD  # merge.json, by the name loratool.merge has always exported
QLORA_POLICIES = ("dequantized", "original")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json",
)  # fmt: skip


def run_merge(
    adapter_dir: str | Path,
    *,
    base: str | None = None,
    output: str | Path | None = None,
    dtype: str = "auto",
    qlora_base: str | None = None,
    verify: bool = True,
    force: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into its base model; return the merged model directory."""

    started = time.time()
    if dtype not in DTYPES:
        raise LoratoolError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    adapter_dir = find_adapter(Path(adapter_dir))
    run = read_training_run(adapter_dir, log)
    check_checkpoint(run, force=force, log=log)
    if run.record is not None:
        refuse_unmergeable(run.record.adapter_init, adapter_dir)  # LoftQ (lora_init.py)
    reward = run.record is not None and run.record.stage == "reward"  # a score head: merge/reward.py
    if reward and run.quantization:
        raise LoratoolError(
            f"{adapter_dir} is a reward model trained on a quantized base: merging it is not built yet",
            hint="load it with peft: PeftModel.from_pretrained(AutoModelForSequenceClassification"
            ".from_pretrained(BASE, num_labels=1), RUN_DIR)",
        )
    adapter = read_adapter(adapter_dir)
    adapter, head = reward_model.split_score_head(adapter) if reward else (adapter, None)
    base_id, base_dir = resolve_base(base, run, adapter)
    identity = check_base_identity(run, base_id, base_dir, force=force, log=log)
    policy = choose_qlora_policy(qlora_base, run)
    output_path = output_location(output, adapter_dir, base_dir)
    with claim_output(output_path, kind="merge", record_name=RECORD, overwrite=overwrite, log=log) as out:
        checkpoint = open_checkpoint(base_dir)
        refuse_quantized_checkpoint(base_dir)
        check_against_base(adapter.updates, checkpoint.shapes())
        tokenizer_dir = adapter_dir if _has_tokenizer(adapter_dir) else base_dir
        check_vocabulary(tokenizer_dir, base_dir)
        base_dtype = checkpoint_dtype(base_dir, checkpoint)
        out_dtype = base_dtype if dtype == "auto" else dtype
        # How training quantized the base: needed to fold into the 4-bit weights (dequantized) and to
        # compare with the 4-bit model (both policies). 8-bit runs have no weight-only round trip.
        quantized = (
            quantized_base(run, base_dir, base_dtype) if policy and run.quantization != "8bit" else None
        )
        planned = plan_output(checkpoint, adapter, dtype)
        if head is not None:
            planned = reward_model.with_score_head(planned, head, out_dtype)
        check_disk_space(output_path, planned, tokenizer_dir)

        log(
            f"merging {adapter_dir} into {base_id} ({base_dir}) as {out_dtype}"
            + (f", QLoRA base policy: {policy}" if policy else "")
        )
        partial = out.partial()
        try:
            fold_into = quantized if policy == "dequantized" else None
            counts = write_weights(checkpoint, adapter, planned, fold_into, partial, log, head)
            write_config(base_dir, partial, out_dtype)
            copy_tokenizer(tokenizer_dir, partial)
            if head is not None:
                reward_model.write_score_config(partial, tokenizer_dir)  # a score model generates nothing
            else:
                write_generation_config(base_dir, partial)
            record = describe_merge(
                adapter, run, base_id, base_dir, identity, out_dtype, policy, quantized, counts
            )
            record = dataclasses.replace(
                record,
                verification=(
                    verify_merge(
                        partial, base_dir, adapter_dir, run, policy, quantized, out_dtype, log, reward
                    )
                    if verify
                    else {"skipped": True}
                ),
                wall_time_s=round(time.time() - started, 2),
            )
            finish(out, partial, record, log)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
    output = output_path
    log(f"merged model written to {output} ({record.wall_time_s:.0f}s)")
    return output


# --- the base ------------------------------------------------------------------------------------------


def resolve_base(given: str | None, run: TrainingRun, adapter: Adapter) -> tuple[str, Path]:
    """(what the user or the run calls the base, its local directory). --base wins; then run.json's
    resolved path, then its id; then adapter_config.json's base_model_name_or_path."""

    recorded_path = run.base.resolved_path
    if given:
        name, revision, origin = given, None, "--base"
    elif recorded_path and Path(recorded_path).is_dir():
        name, revision, origin = recorded_path, None, "run.json"
    elif run.base.id:
        name, revision, origin = run.base.id, run.base.revision, "run.json"
    elif adapter.base_model:
        name, revision, origin = adapter.base_model, None, f"{ADAPTER_CONFIG} (base_model_name_or_path)"
    else:
        raise LoratoolError(
            f"{adapter.path} does not say which base model it belongs to",
            hint="pass --base DIR_OR_HUB_ID",
        )
    found = local_model_dir(name, revision)
    if found is None or not (found / "config.json").is_file():
        where = (
            f"{found} has no config.json" if found else "not a local directory, nor in the Hugging Face cache"
        )
        raise LoratoolError(
            f"base model not found: {name!r} (from {origin}): {where}",
            hint="pass --base a local model directory (config.json + *.safetensors), or a hub id already in "
            "the Hugging Face cache (loratool merge never downloads)",
        )
    # The run's own name for its base (a hub id, or the path as the recipe gave it) reads best in messages.
    return (run.base.id or name) if origin == "run.json" else name, found


def check_base_identity(
    run: TrainingRun, base_id: str, base_dir: Path, *, force: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """Refuse a base whose weights are not the ones the run trained on (unless --force)."""
    recorded = run.base.fingerprint
    actual = weights_fingerprint(base_dir)
    info = {"fingerprint": actual, "recorded_fingerprint": recorded}
    if not recorded:
        return {**info, "fingerprint_check": "not recorded (adapter without run.json)"}
    try:
        matches = fingerprint_matches(base_dir, recorded)
    except LoratoolError as exc:  # a record this version cannot read: only --force merges unchecked
        if not force:
            raise
        log(f"warning: {exc.message}; merging anyway (--force)")
        return {**info, "fingerprint_check": "not checked (unknown fingerprint scheme), merged with --force"}
    if matches:
        return {**info, "fingerprint_check": "match"}
    message = (
        f"the base model is not the one this adapter was trained on: {run.fingerprint_source} records "
        f"{run.base.id or 'its base'} (fingerprint {_short(recorded)}), and {base_id} ({base_dir}) has "
        f"fingerprint {_short(actual)}"
    )
    if not force:
        raise LoratoolError(
            message,
            hint="pass the base the run used as --base, or --force to merge anyway (the result is then not "
            "the model that was trained and evaluated)",
        )
    log(f"warning: {message}; merging anyway (--force)")
    return {**info, "fingerprint_check": "mismatch, merged with --force"}


def check_checkpoint(run: TrainingRun, *, force: bool, log: Callable[[str], None]) -> None:
    """Refuse (unless --force) a checkpoint of a run that is not sealed or was changed since it was saved:
    its adapter may be half written, or not the one the run saved."""
    if run.checkpoint is None or run.checkpoint_problem is None:
        return
    message = f"the checkpoint {run.checkpoint} is {run.checkpoint_problem}"
    if force:
        log(f"warning: {message}; merging it anyway (--force)")
        return
    run_dir = run.record.path if run.record is not None else None
    usable, _ = RunDir(run_dir).latest_checkpoint() if run_dir is not None else (None, [])
    instead = f"merge {usable} (the newest complete checkpoint)" if usable else "merge a complete checkpoint"
    raise LoratoolError(message, hint=f"{instead}, or pass --force to merge this one anyway")


def _short(fingerprint: str | None) -> str:
    return f"{fingerprint[:31]}…" if fingerprint else "none"


def refuse_quantized_checkpoint(base_dir: Path) -> None:
    config = read_config(base_dir)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise LoratoolError(
            f"the base {base_dir} is itself a {method} checkpoint; merging needs its 16/32-bit weights",
            hint="pass the original, unquantized model as --base (loratool quantizes at load time, so QLoRA "
            "runs train from it too)",
        )


def check_vocabulary(tokenizer_dir: Path, base_dir: Path) -> None:
    """An adapter whose tokenizer has more tokens than the base has embeddings was trained on another
    model (or on resized embeddings loratool merge does not fold)."""
    from transformers import AutoTokenizer

    if not _has_tokenizer(tokenizer_dir):
        return
    config = read_config(base_dir)
    vocab = config.get("vocab_size")
    if vocab is None:
        vocab = config.get("text_config", {}).get("vocab_size")
    tokens = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    if vocab is not None and tokens > vocab:
        raise LoratoolError(
            f"the tokenizer in {tokenizer_dir} has {tokens} tokens but the base {base_dir} has a "
            f"vocabulary of {vocab}: the adapter was trained on another model",
            hint="pass the right model as --base",
        )


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


# --- QLoRA ---------------------------------------------------------------------------------------------


def choose_qlora_policy(requested: str | None, run: TrainingRun) -> str | None:
    """None for an adapter trained on a full-precision base; else dequantized or original.

    Default for 4-bit runs: dequantized. The adapter learned to correct the 4-bit weights it saw, so
    folding it into quantize -> dequantize(W) reproduces base + adapter as trained; folding it into the
    original W gives a model that was never trained or evaluated (usually close, never identical).
    """
    if requested is not None and requested not in QLORA_POLICIES:
        raise LoratoolError(f"--qlora-base must be one of {', '.join(QLORA_POLICIES)}, not {requested!r}")
    trained_on = run.quantization
    if trained_on == "8bit":
        if requested == "dequantized":
            raise LoratoolError(
                "--qlora-base dequantized: this adapter was trained on an 8-bit base, whose LLM.int8 matmul "
                "has no fixed dequantized weight to fold into",
                hint="use --qlora-base original (the default for 8-bit runs)",
            )
        return "original"
    if trained_on == "4bit":
        return requested or "dequantized"
    if requested == "dequantized" and run.record is not None:
        raise LoratoolError(
            "--qlora-base dequantized: run.json says this adapter was trained on a full-precision base",
            hint="drop --qlora-base; the adapter is folded into the weights it was trained with",
        )
    return requested  # an adapter from another tool: the user says whether it is QLoRA


def quantized_base(run: TrainingRun, base_dir: Path, base_dtype: str) -> Any:
    """How the run quantized its base: the recipe's quantization section and the dtype it loaded in."""

    q, _, trust_remote_code = trained_with(run)
    skip = q.llm_int8_skip_modules
    return QuantizedBase(
        quant_type=q.bnb_4bit_quant_type,
        double_quant=q.bnb_4bit_use_double_quant,
        load_dtype=training_load_dtype(run, base_dtype),
        skip_modules=tuple(skip) if skip is not None else None,
        weights=quantized_weight_names(base_dir, skip, trust_remote_code),
        device=quantization_device(run.hardware.get("device")),
    )


def trained_with(run: TrainingRun) -> tuple[QuantizationSection, str, bool]:
    """The run's quantization section, model.dtype and model.trust_remote_code (the defaults for an
    adapter without a recipe). A recipe.yaml that no longer validates (another loratool version) still
    holds its resolved values as plain keys: they are taken as written, since they say how the base was
    quantized in training."""
    if run.recipe is not None:
        recipe = run.recipe
        q = recipe.quantization or QuantizationSection()
        return q, recipe.model.dtype, recipe.model.trust_remote_code
    written = (run.record.recipe_dict() if run.record is not None else None) or {}
    quantization = written.get("quantization") or {}
    try:
        q = QuantizationSection.model_validate(quantization)
    except Exception:  # pydantic's ValidationError: a section another loratool version wrote
        q = QuantizationSection.model_construct(**quantization)
    model = written.get("model") or {}
    return q, model.get("dtype", "auto"), bool(model.get("trust_remote_code"))


def training_load_dtype(run: TrainingRun, base_dtype: str) -> str:
    """The dtype the run loaded its base in: model.dtype, with `auto` resolved for the recorded hardware;
    for an adapter without a run, the base's own dtype."""
    from dataclasses import fields

    _, requested, _ = trained_with(run)
    hardware = run.hardware
    if requested != "auto":
        return requested
    if not hardware:
        return base_dtype
    hw = Hardware(**{f.name: hardware.get(f.name) for f in fields(Hardware)})
    return str(model_dtype("auto", hw)).removeprefix("torch.")


# --- the output ----------------------------------------------------------------------------------------


def output_location(output: str | Path | None, adapter_dir: Path, base_dir: Path) -> Path:
    """Where the merged model goes (default ADAPTER/merged; for a checkpoint RUN/merged-checkpoint-N, since
    save_total_limit rotation deletes a checkpoint with whatever is inside it); never over the adapter or
    the base. What may already be there is checked by outputs.check_output."""
    path = Path(output).expanduser().absolute() if output else default_output(adapter_dir)
    resolved = path.resolve()
    if resolved in (adapter_dir, base_dir) or resolved in adapter_dir.parents or resolved in base_dir.parents:
        raise LoratoolError(
            f"--output {path} would replace the adapter or the base model",
            hint="choose a new directory, e.g. --output out/merged",
        )
    return path


def default_output(adapter_dir: Path) -> Path:
    """ADAPTER/merged, or RUN/merged-checkpoint-N beside the checkpoints of RUN (outside the rotation)."""
    run_dir = run_of_checkpoint(adapter_dir)
    return run_dir / f"merged-{adapter_dir.name}" if run_dir is not None else adapter_dir / "merged"


def plan_output(checkpoint: Checkpoint, adapter: Adapter, dtype: str) -> list[list[TensorInfo]]:
    """The tensors of each output shard: the base's names and shapes, in the output dtype."""

    planned = []
    for shard in checkpoint.shards:
        tensors = []
        for t in shard.tensors:
            update = adapter.updates.get(t.name)
            shape = update.result_shape(t.shape) if update else t.shape
            out = SAFETENSORS_DTYPE[dtype] if dtype != "auto" and t.dtype in FLOAT_DTYPES else t.dtype
            tensors.append(TensorInfo(t.name, out, shape))
        planned.append(tensors)
    return planned


def check_disk_space(output: Path, planned: list[list[TensorInfo]], tokenizer_dir: Path) -> None:

    needed = sum(shard_bytes(tensors) for tensors in planned)
    needed += sum((tokenizer_dir / f).stat().st_size for f in TOKENIZER_FILES if (tokenizer_dir / f).exists())
    check_free_space(
        output.parent,
        needed,
        what="the merged model",
        hint="free some space, choose another --output, or write a smaller model with --dtype bfloat16",
    )


def write_weights(
    checkpoint: Checkpoint,
    adapter: Adapter,
    planned: list[list[TensorInfo]],
    quantized: Any,
    folder: Path,
    log: Callable[[str], None],
    head: Any = None,
) -> dict[str, int]:
    """Stream every base shard into its output shard, merging the tensors the adapter changes; a reward
    model's trained score head (`head`) is written where `planned` puts it (merge/reward.py)."""

    counts = {"merged": 0, "from_base": 0}
    data_bytes = 0
    for number, (shard, tensors) in enumerate(zip(checkpoint.shards, planned, strict=True), 1):
        writer = ShardWriter(folder / shard.path.name, tensors, {**shard.metadata, "format": "pt"})
        merged_here = 0
        base = {info.name: info for info in shard.tensors}
        for out in tensors:
            if out.name not in base:  # the score head: not in the base checkpoint
                writer.write(out.name, head.to(torch_dtype(out.dtype)))
                merged_here += 1
                continue
            info = base[out.name]
            update = adapter.updates.get(info.name)
            as_trained_differs = quantized is not None and quantized.changes(info.name, info.dtype)
            if update is None and not as_trained_differs and out.dtype == info.dtype:
                writer.copy(shard, info)  # byte for byte: never materialised as a tensor
                continue
            tensor = read_tensor(shard, info)
            if as_trained_differs:
                tensor = as_trained(tensor, info.name, quantized)
            if update is not None:
                tensor = fold(tensor, update)  # float32
                merged_here += 1
            if tensor.is_floating_point():
                tensor = tensor.to(torch_dtype(out.dtype))
            writer.write(info.name, tensor)
            del tensor
        writer.close()
        data_bytes += writer.data_bytes
        counts["merged"] += merged_here
        counts["from_base"] += len(tensors) - merged_here
        log(f"  shard {number}/{len(checkpoint.shards)} {shard.path.name}: {merged_here} tensor(s) merged")
    if checkpoint.index is not None:
        index = {
            **checkpoint.index,
            "metadata": {**checkpoint.index.get("metadata", {}), "total_size": data_bytes},
            # The tensors each output shard holds (a reward model's differ from the base's by its heads).
            "weight_map": {
                t.name: shard.path.name
                for shard, ts in zip(checkpoint.shards, planned, strict=True)
                for t in ts
            },
        }
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return counts


def write_config(base_dir: Path, folder: Path, dtype: str) -> None:
    config = read_config(base_dir)
    if "torch_dtype" in config:  # the name before transformers 5
        config["torch_dtype"] = dtype
    config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if config.get("auto_map"):  # remote-code models need their modeling files next to the weights
        for source in base_dir.glob("*.py"):
            shutil.copy2(source, folder / source.name)


def copy_tokenizer(tokenizer_dir: Path, folder: Path) -> None:
    """The adapter's tokenizer when it has one: it carries the chat template training used."""
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, folder / name)
    templates = tokenizer_dir / "additional_chat_templates"
    if templates.is_dir():
        shutil.copytree(templates, folder / templates.name)


def write_generation_config(base_dir: Path, folder: Path) -> None:
    """The base's generation config, with generation stopping at the tokenizer's EOS and at the chat
    template's end-of-turn token (a chat fine-tune that only stops at EOS runs on past its answer)."""
    generation = read_json(base_dir / "generation_config.json")
    config = read_config(folder)
    if not generation:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {k: config[k] for k in ids if config.get(k) is not None}
    eos = generation.get("eos_token_id")
    stop = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    for token in stop_token_ids(folder):
        if token not in stop:
            stop.append(token)
    if stop:
        generation["eos_token_id"] = stop[0] if len(stop) == 1 else stop
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


def stop_token_ids(tokenizer_dir: Path) -> list[int]:
    """The tokenizer's EOS id, and the chat template's end-of-turn token when the vocabulary has it as one
    token (an end of turn spelled in several tokens cannot be an id: generate stops on its text)."""
    from transformers import AutoTokenizer

    if not _has_tokenizer(tokenizer_dir):
        return []
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = end_of_turn(tokenizer)
    if end is not None and end.token_id is not None and end.token_id not in ids:
        ids.append(end.token_id)
    return ids


def describe_merge(
    adapter: Adapter,
    run: TrainingRun,
    base_id: str,
    base_dir: Path,
    identity: dict[str, Any],
    dtype: str,
    policy: str | None,
    quantized: Any,
    counts: dict[str, int],
) -> MergeRecord:
    """merge.json: what was merged into what, how, and with which versions (verification is added later)."""
    c = adapter.config
    qlora = None
    if policy is not None:
        trained_on = run.quantization or "4-bit (assumed from --qlora-base)"
        qlora = {
            "base_policy": policy,
            "trained_on": trained_on,
            **(quantized.to_dict() if quantized else {}),
        }
    return MergeRecord(
        status="complete",
        loratool_version=__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        adapter=MergedAdapter(
            path=str(adapter.path),
            loratool_run=run.record is not None,
            r=c.get("r"),
            lora_alpha=c.get("lora_alpha"),
            use_rslora=bool(c.get("use_rslora")),
            use_dora=bool(c.get("use_dora")),
            modules_to_save=c.get("modules_to_save"),
            base_model_name_or_path=c.get("base_model_name_or_path"),
        ),
        base_model=MergedBase(id=base_id, path=str(base_dir), **identity),
        dtype=dtype,
        qlora=qlora,
        tensors=counts,
        versions=library_versions("torch", "transformers", "peft", "safetensors", "bitsandbytes"),
    )


def finish(out: Output, partial: Path, record: MergeRecord, log: Callable[[str], None]) -> None:
    """Write merge.json and move the merge into place — or, if verification failed, keep it under a name
    that says so and raise."""
    verification = record.verification
    if not verification.get("skipped") and not verification["passed"]:
        failed = dataclasses.replace(record, status="failed-verification")
        raise verification_error(verification, out.keep_failed(partial, failed.to_dict()))
    out.place(partial, record.to_dict(), log)


# --- verification --------------------------------------------------------------------------------------


def verify_merge(
    merged_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    run: TrainingRun,
    policy: str | None,
    quantized: Any,
    out_dtype: str,
    log: Callable[[str], None],
    reward: bool = False,
) -> dict[str, Any]:
    """Compare the merged model with base + adapter on probe rows (see merge/verify.py for thresholds;
    a reward model's scores: merge/reward.py)."""
    from transformers import AutoTokenizer

    tight = EXACT if out_dtype == "float32" else ROUNDED
    full = Reference("full_precision_base", "full-precision base + adapter", tight, None)
    four_bit = "4-bit base + adapter, as trained"
    if policy == "dequantized":
        references = [Reference("quantized_base", four_bit, tight, quantized)]
    elif policy == "original" and quantized is not None:
        references = [full, Reference("quantized_base", four_bit, QUANTIZATION_DRIFT, quantized)]
    else:
        references = [full]
    if not _has_tokenizer(merged_dir):
        raise LoratoolError(
            "cannot verify the merge: neither the adapter nor the base has a tokenizer to build probe rows "
            "with",
            hint="pass --no-verify, or put the tokenizer files next to the adapter",
        )
    probes, source = build_probes(AutoTokenizer.from_pretrained(merged_dir), run.recipe, log)
    log(f"verifying on {source}")
    if reward:
        checks = reward_model.verify_scores(merged_dir, base_dir, adapter_dir, probes, out_dtype, log)
    else:
        checks = verify(merged_dir, base_dir, adapter_dir, references, probes, log)
    return {"probes": source, **checks, "passed": all(c["passed"] for c in checks.values())}


def verification_error(verification: dict[str, Any], kept: Path) -> LoratoolError:
    failed = [(k, v) for k, v in verification.items() if isinstance(v, dict) and not v.get("passed", True)]
    details = "; ".join(
        f"vs {v['reference']}: max |Δscore| {v['max_abs_score_diff']:.3g} (allowed: <= {v['allowed']:g})"
        if "max_abs_score_diff" in v  # a reward model (merge/reward.py)
        else f"vs {v['reference']}: max |Δlogit| {v['max_abs_logit_diff']:.3g}, mean KL {v['mean_kl']:.3g}, "
        f"greedy agreement {100 * v['greedy_agreement']:.1f}% (allowed: {_allowed(v['thresholds'])})"
        for _, v in failed
    )
    return LoratoolError(
        f"verification failed: the merged model does not reproduce base + adapter ({details})",
        hint=f"the merged model is kept in {kept} for inspection, not as a usable output; check that --base "
        "is the model the adapter was trained on, and rerun with LORATOOL_DEBUG=1 to report a bug",
    )


def _allowed(t: dict[str, Any]) -> str:
    parts = [] if t["max_abs_logit_diff"] is None else [f"max |Δlogit| <= {t['max_abs_logit_diff']:g}"]
    parts.append(f"mean KL <= {t['max_mean_kl']:g}")
    if t["min_greedy_agreement"] is not None:
        parts.append(f"agreement >= {100 * t['min_greedy_agreement']:g}%")
    return ", ".join(parts)
