"""`loratool merge --adapter a --adapter b ...`: combine several LoRA adapters into one (task arithmetic).

Reads top to bottom like the combination: find the adapters and what their runs say, refuse what the
combination cannot honestly do (QLoRA runs, different bases, unequal ranks for methods that need equal
ones), load the base once in float32, load the adapters into one PeftModel, let PEFT's own
`add_weighted_adapter` combine them, and save the combined adapter alone, with `combine.json`, into a
temporary sibling of `--adapter-output` that is renamed into place at the end. Then (unless
--adapter-only) the combined adapter is folded into the base by `run_merge`, like any single adapter, so
streaming, checks and verification (merged model vs base + combined adapter) all apply.

Memory: the base model and all adapters, in float32, at once (the combination runs inside PEFT).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loratool import __version__
from loratool.adapter.files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, Adapter, check_supported
from loratool.errors import LoratoolError
from loratool.merge.record import RECORD as MERGE_RECORD
from loratool.merge.run import (
    _has_tokenizer,
    check_base_identity,
    check_checkpoint,
    copy_tokenizer,
    output_location,
    refuse_quantized_checkpoint,
    resolve_base,
    run_merge,
)
from loratool.model.fingerprint import file_sha256, fingerprint_scheme
from loratool.rundir.outputs import check_output, claim_output
from loratool.rundir.records import TrainingRun, find_adapter, read_training_run

COMBINE_RECORD = "combine.json"
METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
# PEFT combines these low-rank factors directly, so every adapter must have the same rank; cat stacks the
# factors (rank = sum of ranks) and svd re-factorises the summed update (rank = the largest rank).
SAME_RANK_METHODS = ("linear", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")
DEFAULT_DENSITY = 0.5  # fraction of each update's entries kept by ties/dare; PEFT's examples use 0.2-0.7
# adapter_config fields add_weighted_adapter does not carry into the combined adapter faithfully (it keeps
# the first adapter's config with r = lora_alpha = the new rank, and combines only lora_A / lora_B).
_NOT_COMBINED = {
    "use_dora": "DoRA (magnitude vectors are not combined)",
    "use_rslora": "rsLoRA (the combined adapter would be rescaled by sqrt(r))",
    "modules_to_save": "modules_to_save (full module copies are not combined)",
    "lora_bias": "lora_bias (LoRA biases are not combined)",
}
_COMBINED = "default"  # PEFT saves the adapter named "default" at the top of the directory, others below it


def run_combine(
    adapter_dirs: Sequence[str | Path],
    *,
    weights: Sequence[float] | None = None,
    method: str = "linear",
    density: float | None = None,
    base: str | None = None,
    adapter_output: str | Path | None = None,
    adapter_only: bool = False,
    output: str | Path | None = None,
    dtype: str = "auto",
    verify: bool = True,
    force: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Combine several LoRA adapters into one; fold it into the base unless `adapter_only`. Returns the
    merged model directory, or the combined adapter directory with `adapter_only`."""
    dirs = [find_adapter(Path(d)) for d in adapter_dirs]
    if len(dirs) < 2:
        raise LoratoolError("combining adapters needs at least two --adapter", hint="pass --adapter again")
    weights = check_weights(weights, len(dirs))
    density = check_method(method, density)
    runs = [read_training_run(d) for d in dirs]
    for run in runs:
        check_checkpoint(run, force=force, log=log)
    configs = [_read_config(d) for d in dirs]
    refuse_unsupported(dirs, runs, configs)
    check_same_base(dirs, runs, configs, force=force, log=log)
    check_ranks(dirs, configs, method)
    base_id, base_dir = resolve_base(base, runs[0], Adapter(dirs[0], configs[0], {}))
    refuse_quantized_checkpoint(base_dir)
    for run in runs:  # the base the combination is applied to must be the one each adapter trained on
        check_base_identity(run, base_id, base_dir, force=force, log=log)
    combined_dir = adapter_output_location(adapter_output, dirs, base_dir, method)
    if not adapter_only:  # refuse an existing merge output now, not after the combination
        output = output_location(output, combined_dir, base_dir)
        check_output(output, kind="merge", record_name=MERGE_RECORD, overwrite=overwrite, option="--output")

    with claim_output(
        combined_dir,
        kind="combine",
        record_name=COMBINE_RECORD,
        overwrite=overwrite,
        option="--adapter-output",
        log=log,
    ) as out:
        log(f"combining {len(dirs)} adapters on {base_id} ({base_dir}) with {method}, weights {weights}")
        partial = out.partial()
        try:
            combine_with_peft(dirs, weights, method, density, base_dir, partial)
            tokenizer_dir = next((d for d in dirs if _has_tokenizer(d)), None)
            if tokenizer_dir is not None:  # the first run's tokenizer: the chat template it trained with
                copy_tokenizer(tokenizer_dir, partial)
            record = describe_combination(dirs, runs, weights, method, density, base_id, base_dir)
            out.place(partial, record, log)
        finally:
            if partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
    log(f"combined adapter written to {combined_dir}")
    if adapter_only:
        return combined_dir
    return run_merge(
        combined_dir,
        base=str(base_dir),
        output=output,
        dtype=dtype,
        verify=verify,
        overwrite=overwrite,
        log=log,
    )


# --- checks --------------------------------------------------------------------------------------------


def check_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """One weight per adapter; equal weights (1/n, an average of the updates) when none are given."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise LoratoolError(
            f"--weights has {len(weights)} value(s) for {count} adapters",
            hint=f"give one weight per --adapter, in the same order, e.g. --weights {','.join(['0.5'] * count)}",
        )
    return [float(w) for w in weights]


def check_method(method: str, density: float | None) -> float | None:
    """The density the method uses: --density (default 0.5) for ties/dare, none for the others."""
    if method not in METHODS:
        raise LoratoolError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    if method not in DENSITY_METHODS:
        if density is not None:
            raise LoratoolError(
                f"--density is used by {', '.join(DENSITY_METHODS)}, not by --method {method}",
                hint="drop --density, or choose one of those methods",
            )
        return None
    density = DEFAULT_DENSITY if density is None else density
    if not 0 < density <= 1:
        raise LoratoolError(f"--density must be in (0, 1], not {density}", hint="e.g. --density 0.5")
    return density


def _read_config(adapter_dir: Path) -> dict[str, Any]:
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    check_supported(config, adapter_dir)
    return config


def refuse_unsupported(dirs: list[Path], runs: list[TrainingRun], configs: list[dict[str, Any]]) -> None:
    for adapter_dir, run, config in zip(dirs, runs, configs, strict=True):
        if config.get("peft_type") != "LORA":
            raise LoratoolError(
                f"{adapter_dir} is a {config.get('peft_type')} adapter; loratool combines LoRA adapters only "
                "(PEFT's add_weighted_adapter)",
                hint="merge that adapter on its own: loratool merge --adapter " + str(adapter_dir),
            )
        if run.quantization == "4bit":
            raise LoratoolError(
                f"{adapter_dir} was trained on a 4-bit (QLoRA) base; loratool does not combine QLoRA "
                "adapters yet (each learned to correct its own 4-bit weights, which a combination in full "
                "precision would not reproduce)",
                hint="merge them one by one: loratool merge --adapter RUN (one adapter per command)",
            )
        used = [what for key, what in _NOT_COMBINED.items() if config.get(key)]
        if used:
            raise LoratoolError(
                f"{adapter_dir} uses {', '.join(used)}, which loratool does not combine",
                hint="merge that adapter on its own: loratool merge --adapter " + str(adapter_dir),
            )


def check_same_base(
    dirs: list[Path],
    runs: list[TrainingRun],
    configs: list[dict[str, Any]],
    *,
    force: bool,
    log: Callable[[str], None],
) -> None:
    """Refuse adapters trained on different bases: run.json's base fingerprints when every adapter has
    one, else adapter_config.json's base_model_name_or_path (adapters that do not say are not compared)."""
    fingerprints = [run.base.fingerprint for run in runs]
    # Records compare as strings within one scheme; mixed ones (older runs) are each checked against
    # the base's weights by check_base_identity instead.
    if all(fingerprints) and len({fingerprint_scheme(f) for f in fingerprints}) == 1:
        seen, what = fingerprints, "base fingerprint (run.json)"
    else:
        seen, what = (
            [_base_name(c.get("base_model_name_or_path")) for c in configs],
            "base_model_name_or_path",
        )
    known = [(d, s) for d, s in zip(dirs, seen, strict=True) if s]
    if len({s for _, s in known}) <= 1:
        return
    listing = "; ".join(f"{d}: {s}" for d, s in known)
    message = f"the adapters were trained on different base models ({what}: {listing})"
    if not force:
        raise LoratoolError(
            message,
            hint="combine adapters trained on one base; pass --force to combine anyway (the result is then "
            "applied to the first adapter's base, or --base)",
        )
    log(f"warning: {message}; combining anyway (--force)")


def _base_name(name: str | None) -> str | None:
    if name and Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    return name


def _rank(config: dict[str, Any]) -> int:
    """The rank PEFT's add_weighted_adapter uses for an adapter: r, or the largest in rank_pattern."""
    return max([config.get("r", 8), *(config.get("rank_pattern") or {}).values()])


def check_ranks(dirs: list[Path], configs: list[dict[str, Any]], method: str) -> None:
    ranks = [_rank(c) for c in configs]
    if method in SAME_RANK_METHODS and len(set(ranks)) > 1:
        listing = ", ".join(f"{d.name}: r={r}" for d, r in zip(dirs, ranks, strict=True))
        raise LoratoolError(
            f"--method {method} needs adapters of equal rank, and these differ ({listing})",
            hint="use --method cat (stacks the adapters: rank = sum of ranks, exact) or --method svd "
            "(re-factorises the weighted sum to the largest rank, approximate)",
        )


def adapter_output_location(given: str | Path | None, dirs: list[Path], base_dir: Path, method: str) -> Path:
    """--adapter-output; default: `combined-<method>` next to the first adapter. Never over an adapter or
    the base; what may already be there is checked by outputs.check_output."""
    path = Path(given).expanduser().absolute() if given else dirs[0].parent / f"combined-{method}"
    resolved = path.resolve()
    if (
        resolved == base_dir
        or resolved in base_dir.parents
        or any(resolved == d or resolved in d.parents for d in dirs)
    ):
        raise LoratoolError(
            f"--adapter-output {path} would replace an adapter or the base model",
            hint="choose a new directory, e.g. --adapter-output out/combined",
        )
    return path


# --- the combination -----------------------------------------------------------------------------------


def combine_with_peft(
    dirs: list[Path],
    weights: list[float],
    method: str,
    density: float | None,
    base_dir: Path,
    folder: Path,
) -> None:
    """Load the base once (float32), every adapter into one PeftModel, combine with PEFT's
    add_weighted_adapter, and save only the combined adapter into `folder`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    names = [f"adapter_{i}" for i in range(1, len(dirs) + 1)]
    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name=names[0])
    for name, adapter_dir in zip(names[1:], dirs[1:], strict=True):
        peft_model.load_adapter(adapter_dir, adapter_name=name)
    try:
        peft_model.add_weighted_adapter(names, weights, _COMBINED, combination_type=method, density=density)
    except (ValueError, TypeError) as exc:
        raise LoratoolError(
            f"PEFT cannot combine these adapters with --method {method}: {exc}",
            hint="the adapters must target modules the same way (all as a list of names, or all as one "
            "regex) and must not share modules_to_save; otherwise merge them one by one",
        ) from exc
    # The combined adapter names the base it was combined on, so `loratool merge` finds it on its own.
    peft_model.peft_config[_COMBINED].base_model_name_or_path = str(base_dir)
    peft_model.save_pretrained(folder, selected_adapters=[_COMBINED])


def describe_combination(
    dirs: list[Path],
    runs: list[TrainingRun],
    weights: list[float],
    method: str,
    density: float | None,
    base_id: str,
    base_dir: Path,
) -> dict[str, Any]:
    """combine.json: which adapters (and their exact weights files), how, and on which base."""

    return {
        "loratool_version": __version__,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "method": method,
        "weights": weights,
        "density": density,
        "adapters": [
            {
                "path": str(d),
                "sha256": file_sha256(d / ADAPTER_WEIGHTS),
                "base_fingerprint": run.base.fingerprint,
            }
            for d, run in zip(dirs, runs, strict=True)
        ],
        "base_model": {"id": base_id, "path": str(base_dir)},
    }
