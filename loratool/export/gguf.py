"""A Hugging Face checkpoint (config.json + safetensors + tokenizer.json) -> one GGUF file for llama.cpp.

Why our own writer on the `gguf` package rather than llama.cpp's `convert_hf_to_gguf.py`: the package is
on PyPI (a pinned, ordinary dependency) and gives the file format, the tensor-name tables
(`gguf.get_tensor_name_map`), the quantizers (`gguf.quants`) and special-token handling (`gguf.SpecialVocab`);
the converter script is not packaged (it needs a llama.cpp checkout matching the gguf version), converts
hundreds of architectures we do not test, identifies tokenizers by hashing the vocabularies of released
models (a fine-tuned or tiny vocabulary hashes to nothing it knows, see export/tokenizer.py), and loads
tensors through torch lazily but not with a memory bound we control. What llama.cpp needs per architecture
is small and written out here, checked against that script.

Supported (`SUPPORTED_ARCHITECTURES`): `model_type` llama, mistral (both become llama.cpp's `llama`
architecture, as the reference converter does; llama.cpp has no sliding-window attention for it), qwen2,
qwen3, gemma2, gemma3_text (and gemma3 with a text_config: its language model; the vision tower is left out)
and phi3.

Streaming: every tensor's GGUF name, type and byte size is known from the safetensors headers before any
data is read, so the GGUF header, metadata and tensor table are written first and the tensors are then
converted and appended one at a time: peak memory is about three float32 copies of the largest tensor
(usually the embeddings), whatever the model size. The file is written under a `.partial` name and renamed
only when complete.

Layout rules (from llama.cpp's loader):
- llama arch: Q and K projection rows are permuted from HF's rotate-half RoPE layout to llama.cpp's
  interleaved-pairs layout (`permute_for_rope`); qwen2 uses rotate-half in llama.cpp too: no permutation.
- 1-D tensors and norms stay float32; `--outtype` applies to the 2-D weights. q8_0 needs rows that are a
  multiple of 32 values; a tensor whose rows are not falls back to f16 (as llama.cpp's converter does).
- Tied embeddings: no `output.weight`; llama.cpp reuses `token_embd.weight`.
- Llama 3.1+ `rope_type: llama3` frequency scaling becomes a `rope_freqs.weight` tensor; `linear` becomes
  metadata; Phi-3's `longrope` becomes `rope_factors_long/short.weight` + attention factor; others are refused.
- Gemma 2/3: HF's RMSNorm multiplies by (1 + w), llama.cpp's by w, so every `*norm.weight` is written as
  1 + w. The sqrt(hidden) embedding scale is built into llama.cpp's Gemma graphs (nothing stored); the output
  head is always the tied embedding. llama.cpp fixes the sliding-window layer pattern (Gemma 2: every other
  layer, Gemma 3: 5 of 6) and the attention scale (1/sqrt(head_dim)); a config that differs is refused.
- 4/5-bit types (q4_0, q4_1, q5_0, q5_1: the ones gguf.quants can write; it has no K-quant quantizer, so
  q4_K_M is llama.cpp's `llama-quantize` on our f16 file): token embeddings and output head stay q8_0, as
  llama-quantize also keeps them at higher precision; they are the most sensitive tensors.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError
from loratool.export.tokenizer import add_vocab, read_vocab
from loratool.model.checkpoint import CONFIG, open_checkpoint, read_config, read_tensor
from loratool.progress import Heartbeat

if TYPE_CHECKING:
    import numpy as np

    from loratool.model.checkpoint import Shard, TensorInfo

# HF model_type -> llama.cpp architecture name.
ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",  # the multimodal wrapper: its text_config and language_model weights
    "phi3": "phi3",
}
# What `loratool export --format gguf` accepts; checked against the base's config before any merge.
SUPPORTED_ARCHITECTURES = frozenset(ARCHITECTURES)
OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
# Bytes per weight of each outtype (ggml block size and bytes per block), for disk-space estimates.
BYTES_PER_WEIGHT = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32,
    "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32,
}  # fmt: skip
_LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")
_GEMMA = ("gemma2", "gemma3")
_ROPE_FREQS = "rope_freqs.weight"
_ROPE_LONG, _ROPE_SHORT = "rope_factors_long.weight", "rope_factors_short.weight"
# Multimodal checkpoints (gemma3): the language model's tensors, under the names of the text-only model.
_LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "language_model.model.")
_VISION_PREFIXES = (
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "vision_tower.",
    "multi_modal_projector.",
)


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF: where it comes from and how it is stored."""

    gguf_name: str
    source: str | None  # HF tensor name; None for a tensor computed here (rope_freqs)
    shape: tuple[int, ...]  # PyTorch order (the gguf package reverses it for ggml)
    qtype: Any  # gguf.GGMLQuantizationType
    nbytes: int


def write_gguf(
    model_dir: Path,
    out_file: Path,
    outtype: str = "f16",
    log: Callable[[str], None] = print,
    *,
    name: str | None = None,
) -> Path:
    """Convert the HF checkpoint in `model_dir` into the GGUF file `out_file` (replaced if it exists).

    `name` is general.name (default: the model directory's name).
    Returns `out_file`. Raises LoratoolError for an unsupported architecture, outtype or tokenizer before
    anything is written; an interrupted write leaves only a `.<name>.partial-*` file, removed on error.
    """
    import gguf
    import numpy as np

    model_dir, out_file = Path(model_dir), Path(out_file)
    config = exportable_config(model_dir)
    arch = gguf_architecture(config, model_dir)
    config = text_config(config)
    check_architecture(config, arch, model_dir)
    ftype = file_type(outtype)
    checkpoint = open_checkpoint(model_dir)
    sources = {
        text_name(t.name): (shard, t)
        for shard in checkpoint.shards
        for t in shard.tensors
        if not t.name.startswith(_VISION_PREFIXES)
    }
    plan = plan_tensors(config, arch, {name: t for name, (_, t) in sources.items()}, outtype)
    vocab = read_vocab(model_dir, config["vocab_size"])
    check_name(name or model_dir.name, vocab.tokens)

    writer = gguf.GGUFWriter(path=None, arch=arch)
    add_model_metadata(writer, config, name or model_dir.name, ftype, arch)
    add_vocab(writer, model_dir, vocab, log)
    for t in plan:
        writer.add_tensor_info(t.gguf_name, _byte_shape(t), np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)

    with partial_file(out_file) as partial:
        try:
            writer.write_header_to_file(partial)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            beat = Heartbeat(f"  writing {out_file.name}", len(plan), write=log)
            for done, data in enumerate(_converted(plan, sources, config, arch)):
                beat.tick(done, "tensors")
                writer.write_tensor_data(data)
        finally:
            writer.close()
    counts: dict[str, int] = {}
    for t in plan:
        counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
    log(f"  wrote {out_file} ({len(plan)} tensors: {', '.join(f'{n} {k}' for k, n in counts.items())})")
    return out_file


# --- the model -----------------------------------------------------------------------------------------


def exportable_config(model_dir: Path) -> dict[str, Any]:
    """config.json of a model the GGUF writer can take: refused when missing or quantized."""
    if not (model_dir / CONFIG).is_file():
        raise LoratoolError(
            f"{model_dir} is not a Hugging Face model directory: config.json is missing",
            hint="pass a merged checkpoint (`loratool merge` output) or a `loratool train` run directory",
        )
    config = read_config(model_dir)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise LoratoolError(
            f"{model_dir} is a {method} checkpoint; the GGUF export needs its 16/32-bit weights",
            hint="export the unquantized (merged) model; llama.cpp quantizes on its own (--outtype q8_0 here, "
            "or llama-quantize)",
        )
    return config


def gguf_architecture(config: dict[str, Any], model_dir: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise LoratoolError(
            f"{model_dir}: model_type {model_type!r} cannot be exported to GGUF by loratool",
            hint=f"supported model types: {', '.join(ARCHITECTURES)}",
        )
    if model_type == "gemma3" and "text_config" not in config:
        raise LoratoolError(
            f"{model_dir}: a gemma3 config without text_config", hint="the config.json is incomplete"
        )
    return ARCHITECTURES[model_type]


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: a multimodal gemma3 config's text_config (with the token ids and tying
    that the outer config holds), else the config itself."""
    if config.get("model_type") != "gemma3":
        return config
    inner = dict(config["text_config"])
    inner.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            inner.setdefault(key, config[key])
    # Gemma3TextConfig's defaults where the saved text_config leaves them out.
    inner.setdefault("head_dim", 256)
    inner.setdefault("query_pre_attn_scalar", 256)
    inner.setdefault("rms_norm_eps", 1e-6)
    return {**inner, "model_type": "gemma3_text"}


def text_name(name: str) -> str:
    """A tensor name with the multimodal wrapper's language-model prefix turned into the text model's."""
    for prefix in _LANGUAGE_MODEL_PREFIXES:
        if name.startswith(prefix):
            return "model." + name[len(prefix) :]
    return name


def check_architecture(config: dict[str, Any], arch: str, model_dir: Path) -> None:
    """Refuse settings llama.cpp's graph for `arch` does not have (it would load and compute differently)."""
    if arch not in _GEMMA:
        return
    n_layers, dim = config["num_hidden_layers"], head_dim(config)
    # llama.cpp: 1/sqrt(head_dim), except its "27B" types (by layer count), which use hidden / heads.
    big = n_layers == (46 if arch == "gemma2" else 62)
    expected = config["hidden_size"] // config["num_attention_heads"] if big else dim
    scalar = config.get("query_pre_attn_scalar", 256)
    if scalar != expected:
        raise LoratoolError(
            f"{model_dir}: query_pre_attn_scalar {scalar} differs from what llama.cpp's {arch} uses ({expected})",
            hint="llama.cpp scales attention by 1/sqrt(head_dim) for this model size; such a checkpoint "
            "cannot be exported faithfully",
        )
    period = 2 if arch == "gemma2" else 6  # llama.cpp: layer i slides unless (i + 1) % period == 0
    expected_types = [
        "full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)
    ]
    layer_types = config.get("layer_types")
    if config.get("sliding_window") and layer_types and list(layer_types) != expected_types:
        raise LoratoolError(
            f"{model_dir}: layer_types {layer_types} differ from llama.cpp's fixed {arch} pattern (one "
            f"full-attention layer every {period})",
            hint="llama.cpp cannot express another sliding-window pattern for this architecture",
        )


def check_name(name: str, tokens: list[str]) -> None:
    """llama.cpp gives Phi-3's special tokens their whitespace handling when general.name contains 'phi3' or
    'phi-3', and then fails to load a vocabulary that lacks any of <unk>, <s>, </s>, <|endoftext|>."""
    lowered = name.lower()
    if "phi3" in lowered or "phi-3" in lowered:
        missing = sorted({"<unk>", "<s>", "</s>", "<|endoftext|>"} - set(tokens))
        if missing:
            raise LoratoolError(
                f"the model name {name!r} makes llama.cpp treat the file as Phi-3, whose tokens "
                f"{', '.join(missing)} this vocabulary lacks: llama.cpp would refuse to load it",
                hint="export under a name without 'phi3' / 'phi-3' (rename the directory or pass --output)",
            )


def file_type(outtype: str) -> Any:
    import gguf

    T = gguf.LlamaFileType
    types = {
        "f32": T.ALL_F32,
        "f16": T.MOSTLY_F16,
        "bf16": T.MOSTLY_BF16,
        "q8_0": T.MOSTLY_Q8_0,
        "q5_1": T.MOSTLY_Q5_1,
        "q5_0": T.MOSTLY_Q5_0,
        "q4_1": T.MOSTLY_Q4_1,
        "q4_0": T.MOSTLY_Q4_0,
    }
    if outtype not in types:
        raise LoratoolError(
            f"unknown --outtype {outtype!r}",
            hint=f"choose one of {', '.join(OUTTYPES)} (for K-quants such as q4_K_M, run llama.cpp's "
            "llama-quantize on the f16 export)",
        )
    return types[outtype]


def head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_parameters(config: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """rope_theta and scaling, wherever the config keeps them (transformers 5: `rope_parameters`, per layer
    type for Gemma 3; before: `rope_theta` + `rope_scaling`). `layer_type`: which of a per-layer-type dict."""
    params = dict(config.get("rope_scaling") or {})
    saved = config.get("rope_parameters") or {}
    if "full_attention" in saved or "sliding_attention" in saved:
        saved = saved.get(layer_type) or {}
    params.update(saved)
    if layer_type == "sliding_attention" and config.get("rope_local_base_freq"):
        params.setdefault("rope_theta", config["rope_local_base_freq"])
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def rope_dimensions(config: dict[str, Any]) -> int:
    """Rotated dimensions per head (Phi-3's partial_rotary_factor can rotate fewer than all)."""
    factor = (
        rope_parameters(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    )
    if factor == 1.0:
        return head_dim(config)
    return int(factor * config["hidden_size"]) // config["num_attention_heads"]


def add_model_metadata(
    writer: Any, config: dict[str, Any], name: str, ftype: Any, arch: str = "llama"
) -> None:
    """The hyperparameters llama.cpp reads for `arch` (checked against its converter, convert_hf_to_gguf)."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(rope_dimensions(config))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.get("attn_logit_softcapping") or 0.0)
        writer.add_final_logit_softcapping(config.get("final_logit_softcapping") or 0.0)
    if arch == "gemma3" and config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    if arch in _GEMMA and config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(rope_parameters(config, "sliding_attention")["rope_theta"])
    if arch == "phi3":
        original = config.get("original_max_position_embeddings") or rope.get(
            "original_max_position_embeddings"
        )
        writer.add_rope_scaling_orig_ctx_len(original or config["max_position_embeddings"])
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if rope["rope_type"] in ("longrope", "su"):
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(
                math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
            )
    writer.add_file_type(ftype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# --- tensors -------------------------------------------------------------------------------------------


def plan_tensors(
    config: dict[str, Any], arch: str, sources: dict[str, TensorInfo], outtype: str
) -> list[PlannedTensor]:
    """Every GGUF tensor, in file order, with its name, type and size; refuses what llama.cpp cannot load."""
    import gguf

    arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    # Gemma's output head is always the embedding in llama.cpp (Gemma 2 configs may not say tied).
    tied = bool(config.get("tie_word_embeddings")) or arch in _GEMMA
    plan, unknown = [], []
    rope = rope_parameters(config)
    if rope["rope_type"] == "llama3" and arch == "llama":
        plan.append(_planned(_ROPE_FREQS, None, (head_dim(config) // 2,), outtype))
    elif rope["rope_type"] in ("longrope", "su") and arch == "phi3":
        for factors in (_ROPE_LONG, _ROPE_SHORT):
            plan.append(_planned(factors, None, (rope_dimensions(config) // 2,), outtype))
    elif rope["rope_type"] not in ("default", "linear"):
        raise LoratoolError(
            f"rope scaling {rope['rope_type']!r} is not supported by loratool's GGUF export for {arch}",
            hint="supported: no scaling, linear, llama3 (llama), longrope (phi3)",
        )
    if arch == "gemma3" and rope_parameters(config, "sliding_attention")["rope_type"] != "default":
        raise LoratoolError(
            "rope scaling on Gemma 3's sliding-window layers is not supported by llama.cpp",
            hint="only the full-attention layers' rope may be scaled (linear)",
        )
    for name, info in sources.items():
        if name.endswith("rotary_emb.inv_freq"):  # recomputed by llama.cpp from rope_theta
            continue
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(name)
            continue
        plan.append(_planned(gguf_name, name, info.shape, outtype))
    if unknown:
        raise LoratoolError(
            f"{len(unknown)} tensor(s) have no llama.cpp {arch} equivalent: {', '.join(unknown[:5])}"
            + (" ..." if len(unknown) > 5 else ""),
            hint="export a standard checkpoint of a supported architecture (was the model modified?)",
        )
    if not tied and "lm_head.weight" not in sources:
        raise LoratoolError(
            "the checkpoint has no lm_head.weight but config.json says the embeddings are not tied",
            hint="the checkpoint is incomplete; merge or download it again",
        )
    return plan


def _planned(gguf_name: str, source: str | None, shape: tuple[int, ...], outtype: str) -> PlannedTensor:
    import gguf

    T = gguf.GGMLQuantizationType
    if outtype in _LOW_BIT and gguf_name in ("token_embd.weight", "output.weight"):
        outtype = "q8_0"  # see the module docstring
    wanted = {
        "f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0,
        "q5_1": T.Q5_1, "q5_0": T.Q5_0, "q4_1": T.Q4_1, "q4_0": T.Q4_0,
    }[outtype]  # fmt: skip
    # Norms and 1-D tensors stay float32: llama.cpp's kernels for them take f32 only.
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        wanted = T.F32
    block, type_size = gguf.GGML_QUANT_SIZES[wanted]
    if shape[-1] % block:
        wanted, (block, type_size) = T.F16, gguf.GGML_QUANT_SIZES[T.F16]
    nbytes = math.prod(shape[:-1]) * (shape[-1] // block) * type_size
    return PlannedTensor(gguf_name, source, tuple(shape), wanted, nbytes)


def _byte_shape(t: PlannedTensor) -> tuple[int, ...]:
    """The shape the gguf package wants with a uint8 buffer: last dimension in bytes (for every type, so
    that all tensors are written as raw bytes)."""
    return (*t.shape[:-1], t.nbytes // max(1, math.prod(t.shape[:-1])))


def _converted(
    plan: list[PlannedTensor], sources: dict[str, tuple[Shard, TensorInfo]], config: dict[str, Any], arch: str
) -> Iterator[np.ndarray]:
    """Each planned tensor's bytes, read, permuted and converted one at a time."""
    import gguf
    import numpy as np

    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    rope = rope_parameters(config)
    for t in plan:
        if t.gguf_name == _ROPE_FREQS:
            data = llama3_rope_factors(config)
        elif t.gguf_name in (_ROPE_LONG, _ROPE_SHORT):
            key = "long_factor" if t.gguf_name == _ROPE_LONG else "short_factor"
            data = np.asarray(rope[key], dtype=np.float32)
            if data.shape != t.shape:
                raise LoratoolError(
                    f"rope {key} has {data.size} values; {t.shape[0]} expected (rotary dimensions / 2)",
                    hint="the config's rope scaling does not fit the model",
                )
        else:
            shard, info = sources[t.source]
            data = read_tensor(shard, info).float().numpy()
            if arch == "llama" and t.source.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_for_rope(data, n_head)
            elif arch == "llama" and t.source.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_for_rope(data, n_kv)
            elif arch in _GEMMA and t.source.endswith("norm.weight"):
                data = data + 1.0  # HF Gemma's RMSNorm scales by (1 + w), llama.cpp's by w
        if t.qtype == gguf.GGMLQuantizationType.F32:
            out = np.ascontiguousarray(data, dtype=np.float32)
        elif t.qtype == gguf.GGMLQuantizationType.F16:
            out = np.ascontiguousarray(data, dtype=np.float16)
        else:
            out = gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), t.qtype)
        out = out.view(np.uint8).reshape(_byte_shape(t))
        if out.nbytes != t.nbytes:  # a bug here would corrupt every tensor after this one
            raise AssertionError(f"{t.gguf_name}: {out.nbytes} bytes, planned {t.nbytes}")
        yield out
        del data, out


def permute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half layout -> llama.cpp's interleaved pairs, for the rows of a Q or K projection.

    HF rotates dimension i with i + d/2 within each head; llama.cpp (GGML_ROPE_TYPE_NORM, used by the llama
    architecture) rotates 2i with 2i + 1. So within each head the rows [first half | second half] are
    interleaved: row j of the first half goes to 2j, row j of the second half to 2j + 1.
    """
    rows = weight.shape[0]
    head = rows // n_head
    return weight.reshape(n_head, 2, head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_for_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_for_rope (tests use it to compare a GGUF with its source)."""
    rows = weight.shape[0]
    head = rows // n_head
    return weight.reshape(n_head, head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config: dict[str, Any]) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE divisors, which llama.cpp reads from the `rope_freqs` tensor.

    Frequencies whose wavelength is shorter than original_context / high_freq_factor are kept (1),
    longer than original_context / low_freq_factor are divided by `factor`, and the band in between is
    interpolated smoothly (the same rule as transformers' `_compute_llama3_parameters`).
    """
    import numpy as np

    rope = rope_parameters(config)
    dim = head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    inv_freq = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelength = 2 * math.pi / inv_freq
    smooth = (old_context / wavelength - low) / (high - low)
    between = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(
        wavelength < old_context / high, 1.0, np.where(wavelength > old_context / low, factor, between)
    )
    return factors.astype(np.float32)


@contextmanager
def partial_file(out_file: Path) -> Iterator[Path]:
    """A `.<name>.partial-*` file next to `out_file` for the block to write: made readable and renamed onto
    `out_file` when the block ends, removed when it raises, so no half-written GGUF ever has the real name."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    fd, partial_name = tempfile.mkstemp(prefix=f".{out_file.name}.partial-", dir=out_file.parent)
    os.close(fd)
    partial = Path(partial_name)
    try:
        yield partial
        make_readable(partial)
        os.replace(partial, out_file)
    finally:
        partial.unlink(missing_ok=True)


def make_readable(path: Path) -> None:
    """mkstemp creates the file private (0600); the export should get the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
