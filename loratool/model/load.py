"""Loading the base model and its tokenizer: the `base_model`, `model` and `quantization` sections."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError
from loratool.model.attention import use_per_example_attention
from loratool.model.bnb_cpu import use_exact_4bit_matmul
from loratool.model.gguf_base import check_gguf_file, is_gguf, resolve_base_model
from loratool.model.hardware import Hardware, compute_dtype, model_dtype, quant_storage

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

    from loratool.recipe import ModelSection, QuantizationSection, Recipe


def looks_like_local_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else (./x, /x, ~/x, a/b/c, x.safetensors) is a path. So
    is a name that is there on disk, even as a broken link: it is reported as what it is, not looked up."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.lexists(name)


def path_kind(path: Path) -> str | None:
    """What is at `path` when it is neither a regular file nor a directory (after following links), in
    words for an error ("a FIFO (named pipe)", "a symbolic link loop", ...); None for a file, a directory
    or nothing at all. The path is never opened: opening a FIFO blocks until something writes to it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "a symbolic link loop"
        try:
            return f"a broken symbolic link (to {os.readlink(path)})" if path.is_symlink() else None
        except OSError:
            return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def shown_path(path: Path) -> str:
    """An absolute path for messages; links are not followed (a symbolic link loop has no resolved path)."""
    return os.path.abspath(path.expanduser())


def check_base_model_exists(base_model: str, key: str = "base_model") -> None:
    """A local base model (or `model.tokenizer`, as `key` says) must be a directory, a .gguf a file: say
    what is there instead, or that nothing is. Hub ids are left to the loaders."""
    what = "base model" if key == "base_model" else key
    path = Path(base_model).expanduser()
    if is_gguf(base_model):
        kind = path_kind(path) or ("a directory" if path.is_dir() else None)
        if kind is not None:
            raise LoratoolError(
                f"{what} {shown_path(path)} is {kind}, not a .gguf file",
                hint=f"set {key} to the .gguf file itself (a Hugging Face model directory is named "
                "without the .gguf suffix)",
            )
        check_gguf_file(path)
        return
    if looks_like_local_path(base_model) and not path.is_dir():
        kind = path_kind(path) or ("a file" if path.is_file() else None)
        if kind is not None:
            raise LoratoolError(
                f"{what} {shown_path(path)} is {kind}, not a model directory",
                hint=f"set {key} to the directory that holds config.json and the weights (or the tokenizer "
                "files), or to a hub id such as meta-llama/Llama-2-7b-hf",
            )
        resolved = path.resolve()
        raise LoratoolError(
            f"{what} not found: {resolved} is not a directory",
            hint=f"set {key} to a local model directory (with config.json) or a hub id such as "
            "meta-llama/Llama-2-7b-hf",
        )


@dataclass(frozen=True)
class Base:
    """The base model of a command, resolved once and handed on: the name the recipe gives, what the
    loaders read (a local directory, a .gguf file's cached conversion, or the hub id), and the directory
    holding its weights when they are on this machine (for the fingerprint)."""

    name: str
    revision: str | None
    source: str
    weights_dir: Path | None


def resolve_base(name: str, revision: str | None, log: Callable[[str], None] = print) -> Base:
    """The Base `name` stands for; a .gguf file is converted now if its conversion is not cached."""
    source = resolve_base_model(name, log)
    return Base(name, revision, source, local_model_dir(name, revision, log))


def load_tokenizer(
    base_model: str | Base, model: ModelSection, log: Callable[[str], None] = print
) -> PreTrainedTokenizerBase:
    """The tokenizer of `base_model` (or of `model.tokenizer`); a .gguf is converted first (gguf_base.py)."""
    base = base_model if isinstance(base_model, Base) else None
    base_model = base.name if base is not None else base_model
    from transformers import AutoTokenizer

    check_base_model_exists(base_model)
    if model.tokenizer:
        check_base_model_exists(model.tokenizer, "model.tokenizer")
    if base is not None and not model.tokenizer:
        source = base.source  # resolved once by the caller
    else:
        source = resolve_base_model(model.tokenizer or base_model, log)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise _not_loadable("tokenizer", source, exc) from None
    _keep_context_length(tokenizer, source, model)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            # Caught here, not by the trainer after the model has loaded: nothing could pad a batch.
            key = "model.tokenizer" if model.tokenizer else "base_model"
            raise LoratoolError(
                f"the tokenizer of {source} ({key}) has neither a pad token nor an eos token: training, "
                "evaluation and generation pad their batches with one of them",
                hint="set model.tokenizer to a tokenizer that defines an eos token (the pad token then "
                "defaults to it), or add one to this tokenizer (tokenizer.add_special_tokens({'eos_token': "
                "'</s>'}), then save_pretrained) and point model.tokenizer at the result",
            )
        # Padding-free batches never pad, but evaluation and generation need a pad id; EOS is the usual
        # stand-in and is never confused with a target because padded positions carry no loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _keep_context_length(tokenizer: Any, source: str, model: ModelSection) -> None:
    """A tokenizer saved without `model_max_length` reads back as 1e30 (transformers' "no limit"), and the
    adapter's saved tokenizer would tell other tools the model has no context limit: take the model's."""
    from transformers import AutoConfig

    if tokenizer.model_max_length < 1e9:
        return
    try:
        config = AutoConfig.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    except (OSError, ValueError):
        return
    for part in (config, getattr(config, "text_config", None)):
        value = getattr(part, "max_position_embeddings", None) if part is not None else None
        if isinstance(value, int) and value > 0:
            tokenizer.model_max_length = value
            return


def build_quantization_config(q: QuantizationSection, dtype: Any) -> BitsAndBytesConfig:
    """The `quantization` section as a BitsAndBytesConfig; `auto` compute dtype = the model dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = dtype if q.bnb_4bit_compute_dtype == "auto" else getattr(torch, q.bnb_4bit_compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=q.load_in_4bit,
        load_in_8bit=q.load_in_8bit,
        bnb_4bit_quant_type=q.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=getattr(torch, q.bnb_4bit_quant_storage) if q.bnb_4bit_quant_storage else None,
        llm_int8_threshold=q.llm_int8_threshold,
        llm_int8_skip_modules=q.llm_int8_skip_modules,
    )


def load_model(
    recipe: Recipe, hw: Hardware, log: Callable[[str], None] = print, base: Base | None = None
) -> PreTrainedModel:
    """The frozen base, in the dtype the hardware supports, quantized if the recipe says so. A .gguf base
    loads from its cached conversion (made now if missing), so quantization applies on top of that.
    `base`: the base as the caller resolved it (else resolved here from the recipe)."""
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    base_model = base.source if base is not None else resolve_base_model(recipe.base_model, log)

    kwargs: dict[str, Any] = {
        "revision": recipe.model.revision,
        "trust_remote_code": recipe.model.trust_remote_code,
        "dtype": model_dtype(recipe.model.dtype, hw),
        "use_safetensors": True,  # never unpickle weights: a .bin-only checkpoint is refused below
    }
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    if recipe.quantization is not None:
        kwargs["quantization_config"] = build_quantization_config(
            recipe.quantization, compute_dtype(recipe, hw)
        )
        # FSDP / ZeRO-3 shard only weights of one dtype: the 4-bit codes are then stored in the compute dtype.
        storage = quant_storage(recipe, hw)
        if storage is not None:
            kwargs["quantization_config"].bnb_4bit_quant_storage = storage
        # Quantized weights are placed at load time; under DDP each process holds its own copy.
        kwargs["device_map"] = (
            {"": PartialState().local_process_index} if hw.device == "cuda" else {"": "cpu"}
        )
    try:
        if recipe.reward is not None:
            model = load_score_model(base_model, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except (OSError, ValueError) as exc:
        if local_dir_has_only_pickles(base_model):
            raise LoratoolError(
                f"{recipe.base_model} has weights only in pickle files (*.bin / *.pt), which loratool does not "
                "load: unpickling can run arbitrary code",
                hint="convert the checkpoint once to safetensors (load it yourself, then "
                "save_pretrained(dir, safe_serialization=True)) and point base_model at the result",
            ) from None
        raise _not_loadable("model", recipe.base_model, exc) from None
    if recipe.quantization is not None:
        # Before the first forward: the trainer's evaluations, eval and generate would otherwise run 4-bit
        # layers through a bfloat16 kernel on AVX512-BF16 CPUs (loratool/model/bnb_cpu.py).
        use_exact_4bit_matmul(model)
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    if recipe.data.padding_free and recipe.stage == "sft":  # preference batches are padded (dpo.py, ...)
        # Flattened batches: sdpa / eager attend within each example instead of over the whole row
        # (attention.py); flash attention keeps its own varlen kernels.

        if (name := use_per_example_attention(model)) is not None:
            log(f"attention: {name} (padding-free batches: each example attends only to itself)")
    return model


def load_score_model(source: str, pad_token_id: int | None = None, **kwargs: Any) -> PreTrainedModel:
    """The base with a one-number score head (a reward model: transformers' ForSequenceClassification
    class of the architecture, num_labels=1; the head starts random and is trained with the adapter). The
    head reads the last token that is not padding, so the config must know the pad id: `pad_token_id`
    (the tokenizer's), else the config's own, else its eos (what load_tokenizer pads with then)."""
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    # transformers reports the new head as missing and the language-model head as unused: both expected.
    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, **kwargs)
    config = model.config.get_text_config()
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id
    elif config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.config.pad_token_id = config.pad_token_id
    return model


def model_from_config(recipe: Recipe, config: Any) -> PreTrainedModel:
    """The recipe's model built from `config` with fresh weights, on the current default device (the
    meta device for `train --dry-run` and `plan`): with the one-label score head of a reward model."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    trust = recipe.model.trust_remote_code
    if recipe.reward is None:
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    config = copy.deepcopy(config)
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust)


def local_dir_has_only_pickles(base_model: str) -> bool:
    path = Path(base_model).expanduser()
    if not path.is_dir():
        return False
    has_pickles = any(path.glob("*.bin")) or any(path.glob("*.pt"))
    return has_pickles and not any(path.glob("*.safetensors"))


def _not_loadable(what: str, source: str, exc: Exception) -> LoratoolError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if looks_like_local_path(source):
        hint = (
            f"check that {source} holds a Hugging Face {what} (config.json, *.safetensors, tokenizer files)"
        )
    else:
        hint = (
            f"'{source}' is read as a hub id: check its spelling on the hub; on a machine without network it "
            "must be in the Hugging Face cache and HF_HUB_OFFLINE=1 set; a gated repository (Llama, Gemma, "
            "...) needs `hf auth login` with an account that accepted its licence — or point base_model at "
            "a local directory"
        )
    return LoratoolError(f"cannot load the {what} from '{source}': {first_line}", hint=hint)


def local_model_dir(base_model: str, revision: str | None, log: Callable[[str], None] = print) -> Path | None:
    """The directory holding the base weights: the path itself, its snapshot in the hub cache, or the
    conversion of a .gguf file (made now if missing)."""
    if is_gguf(base_model):
        return Path(resolve_base_model(base_model, log))
    if Path(base_model).expanduser().is_dir():
        return Path(base_model).expanduser().resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base_model, revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a hub id): the fingerprint is then simply unknown
        return None
