"""A trained LoRA adapter -> a GGUF LoRA file that llama.cpp applies with `--lora` (Ollama: `ADAPTER`).

The format (what llama.cpp's convert_lora_to_gguf.py writes and src/llama-adapter.cpp reads):
- metadata: general.architecture = the base's llama.cpp architecture, general.type = "adapter",
  adapter.type = "lora", adapter.lora.alpha (float32);
- per LoRA'd weight with GGUF name N (e.g. `blk.0.attn_q.weight`, the names export/gguf.py gives the base):
  `N.lora_a`, PyTorch shape (r, in), and `N.lora_b`, PyTorch shape (out, r), in f16 or f32.

llama.cpp adds scale * B @ (A @ x), with scale = user_scale * alpha / r where r is lora_b's width, and
scale = user_scale when alpha is 0. PEFT's scaling is alpha / r, alpha / sqrt(r) (use_rslora) or per
module (rank_pattern, alpha_pattern), so we fold PEFT's own per-module scaling into lora_b and write alpha 0:
llama.cpp's scale is then exactly the user's `--lora-scaled` factor (1 with `--lora`) for every pattern.

The base GGUF's layout is ours (export/gguf.py), so the adapter follows it: for the llama architecture the
Q and K rows are permuted for RoPE (`permute_for_rope`), and so are the rows of their lora_b (the output
side); lora_a is untouched. Other architectures store the projections as Hugging Face does. (Gemma's
norms, written as 1 + w, are not LoRA targets.)

Refused, with the reason, because llama.cpp cannot apply it: DoRA (use_dora: its magnitude rescales the
merged weight), modules_to_save and other full weight copies, LoRA on the embeddings or the output head
(llama.cpp's converter handles token_embd specially), LoRA biases (lora_bias), LoRA on non-Linear modules,
PEFT methods other than LoRA, and base architectures the GGUF writer does not support (gguf.ARCHITECTURES).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.adapter.files import (
    ADAPTER_CONFIG,
    Adapter,
    TensorUpdate,
    check_adapter_files,
    read_adapter,
)
from loratool.errors import LoratoolError
from loratool.export.gguf import (  # the base GGUF's names and layout, which the adapter must follow
    exportable_config,
    gguf_architecture,
    partial_file,
    permute_for_rope,
    text_config,
    text_name,
)

if TYPE_CHECKING:
    import numpy as np

OUTTYPES = ("f16", "f32")
_EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out")
HINT = (
    "export the merged model instead: `loratool export RUN --format gguf` (merges, then converts), which "
    "handles every adapter loratool merge folds"
)


def write_gguf_lora(
    adapter_dir: Path,
    base_dir: Path,
    out_file: Path,
    outtype: str = "f16",
    log: Callable[[str], None] = print,
    *,
    name: str | None = None,
) -> Path:
    """Write the LoRA adapter in `adapter_dir` (for the HF base in `base_dir`) as the GGUF LoRA `out_file`.

    Raises LoratoolError for what llama.cpp cannot apply (module docstring) before anything is written."""
    import gguf

    adapter_dir, base_dir, out_file = Path(adapter_dir), Path(base_dir), Path(out_file)
    check_outtype(outtype)
    config = exportable_config(base_dir)
    arch = gguf_architecture(config, base_dir)
    config = text_config(config)
    tensors = lora_tensors(adapter_dir, config, arch, outtype)

    with partial_file(out_file) as partial:
        writer = gguf.GGUFWriter(path=partial, arch=arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_name(name or adapter_dir.name)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # PEFT's scaling is in lora_b: docstring
            for tensor_name, data in tensors.items():
                writer.add_tensor(tensor_name, data)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    log(f"  wrote {out_file} ({len(tensors) // 2} LoRA pairs, {outtype})")
    return out_file


def check_outtype(outtype: str) -> None:
    if outtype not in OUTTYPES:
        raise LoratoolError(
            f"--outtype {outtype!r} is not available for --format gguf-lora",
            hint="use f16 (default) or f32; llama.cpp applies the adapter on top of a base of any type, so "
            "quantize the base GGUF instead",
        )


def lora_tensors(adapter_dir: Path, config: dict[str, Any], arch: str, outtype: str) -> dict[str, np.ndarray]:
    """`N.lora_a` / `N.lora_b` for every LoRA'd weight, scaled, permuted and typed as they are written."""
    import gguf
    import numpy as np

    adapter = read_lora_adapter(adapter_dir)
    arch_enum = next(a for a, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == arch)
    names = gguf.get_tensor_name_map(arch_enum, config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    dtype = np.float16 if outtype == "f16" else np.float32
    out: dict[str, np.ndarray] = {}
    for target, update in sorted(adapter.updates.items()):
        check_update(target, update, adapter_dir)
        hf_name = text_name(target)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise LoratoolError(
                f"{adapter_dir}: LoRA on {target}, which has no llama.cpp {arch} tensor",
                hint="llama.cpp applies LoRA to the model's own Linear weights only; " + HINT,
            )
        lora = update.lora
        A = lora.A.float().numpy()
        # PEFT's scaling folded into B in float32, before any rounding to f16 (module docstring).
        B = (lora.B.float() * lora.scaling).numpy()
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            B = permute_for_rope(B, n_head)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            B = permute_for_rope(B, n_kv)
        out[f"{gguf_name}.lora_a"] = np.ascontiguousarray(A, dtype=dtype)
        out[f"{gguf_name}.lora_b"] = np.ascontiguousarray(B, dtype=dtype)
    if not out:
        raise LoratoolError(f"{adapter_dir}: the adapter has no LoRA weights", hint=HINT)
    return out


def read_lora_adapter(adapter_dir: Path) -> Adapter:
    """The adapter, refused when its config asks for what llama.cpp cannot apply (module docstring)."""
    config = check_adapter_files(adapter_dir)
    where = adapter_dir / ADAPTER_CONFIG
    if config.get("peft_type") != "LORA":
        raise LoratoolError(
            f"{where}: peft_type is {config.get('peft_type')!r}; a GGUF LoRA file holds LoRA adapters only",
            hint=HINT,
        )
    if config.get("use_dora"):
        raise LoratoolError(
            f"{where}: a DoRA adapter (use_dora); llama.cpp applies plain LoRA pairs and has no DoRA "
            "magnitude",
            hint=HINT,
        )
    if config.get("modules_to_save"):
        raise LoratoolError(
            f"{where}: modules_to_save {config['modules_to_save']} are full trained copies of those modules, "
            "which a GGUF LoRA file cannot hold",
            hint=HINT,
        )
    if config.get("lora_bias"):
        raise LoratoolError(f"{where}: lora_bias: llama.cpp's LoRA has no bias term", hint=HINT)
    return read_adapter(adapter_dir)


def check_update(target: str, update: TensorUpdate, adapter_dir: Path) -> None:
    """One base tensor's change must be a plain LoRA pair on a Linear weight."""
    module = target.rsplit(".", 1)[0]
    if module.rsplit(".", 1)[-1] in _EMBEDDINGS:
        raise LoratoolError(
            f"{adapter_dir}: LoRA on {module} (the embeddings or the output head); loratool's GGUF LoRA "
            "export writes LoRA on Linear layers only (llama.cpp handles token_embd specially)",
            hint="train without it in lora.target_modules, or " + HINT,
        )
    lora = update.lora
    if update.replacement is not None or lora is None:
        raise LoratoolError(
            f"{adapter_dir}: the adapter replaces {target} ({', '.join(update.sources)}), which a GGUF LoRA "
            "file cannot hold",
            hint=HINT,
        )
    if update.added is not None or lora.magnitude is not None:
        raise LoratoolError(
            f"{adapter_dir}: {target} has a LoRA bias or DoRA magnitude, which llama.cpp does not apply",
            hint=HINT,
        )
    if lora.A.dim() != 2 or lora.fan_in_fan_out or not target.endswith(".weight"):
        raise LoratoolError(
            f"{adapter_dir}: LoRA on {module}, which is not a Linear layer (lora_A {tuple(lora.A.shape)})",
            hint="llama.cpp applies LoRA to Linear weights only; " + HINT,
        )
