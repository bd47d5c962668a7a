"""A PEFT LoRA adapter read as a list of changes to named base tensors, and the arithmetic that folds them in.

PEFT saves `base_model.model.<module>.<what>`, where <what> is
    lora_A.weight, lora_B.weight (lora_B.bias with lora_bias)   a LoRA pair on a Linear / Conv1D layer
    lora_embedding_A, lora_embedding_B                          a LoRA pair on an Embedding
    lora_magnitude_vector                                       DoRA's magnitude, one value per output
    base_layer.weight                                           a full copy of a targeted embedding
    weight, bias, ...                                           a full trained copy (modules_to_save, bias)
(adapter names are stripped when saving; `lora_A.<name>.weight` from other tools is accepted too). Each
becomes a `TensorUpdate` of the base tensor `<module>.weight` (or `.bias`, or `<module>.<param>`).

Two other PEFT methods are LoRA pairs in disguise and are read as such:
    AdaLoRA  `<module>.lora_A`, `lora_E`, `lora_B` (SVD form, each layer at the rank it kept):
             delta = B @ (A * E) * scaling / init_r, i.e. the pair (A * E, B) at scaling / init_r
    VeRA     `base_model.vera_A`, `base_model.vera_B` (random projections shared by every layer) and per
             layer `<module>.vera_lambda_d`, `vera_lambda_b`: delta = (lambda_b * B) @ (lambda_d * A),
             with A cut to the layer's input width and B to its output width, at scaling 1

The arithmetic is PEFT's own merge (peft/tuners/lora/layer.py `Linear.get_delta_weight`, `Embedding.
get_delta_weight`; peft/tuners/lora/variants.py `DoraLinearVariant.merge_safe`), in the same operation
order, so a float32 merge matches `merge_and_unload()` to the last few bits.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loratool.errors import LoratoolError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_E|lora_embedding_A|lora_embedding_B|lora_magnitude_vector"
    r"|vera_lambda_b|vera_lambda_d)"
    r"(?:\.(?!weight$|bias$)[^.]+)?(?:\.(?P<param>weight|bias))?$"
)
# A full copy PEFT saves under a wrapper name; the base tensor is <module>.<param>.
_COPY_KEY = re.compile(r"^(?P<module>.+)\.(?:base_layer|modules_to_save\.[^.]+)\.(?P<param>[^.]+)$")

# adapter_config fields that change what the adapter computes in ways a weight merge cannot express (or
# that loratool does not implement); each is refused when set, naming the field.
_UNSUPPORTED_FIELDS = {
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "target_parameters": "LoRA on bare nn.Parameters (MoE experts)",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable tokens",
}
# The adapter types merge folds, each read as LoRA pairs (module docstring).
FOLDED_TYPES = ("LORA", "ADALORA", "VERA")
VERA_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")  # VeRA's shared projections, (r, in) / (out, r)
# Initialisations that rewrite the base weights when the adapter is created (PEFT recomputes that on load):
# folding such an adapter into the untouched base would not give the trained model.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class LoraFactors:
    """One LoRA pair: delta = scaling * B @ A, laid out like the base weight."""

    A: torch.Tensor  # (r, in) — for an embedding (r, num_embeddings)
    B: torch.Tensor  # (out, r) — for an embedding (embedding_dim, r)
    scaling: float
    # True when the base weight is stored (in, out): GPT-2's Conv1D, and every embedding (PEFT computes an
    # embedding's delta as (B @ A).T, i.e. as a fan-in-fan-out layer; DoRA's embedding layer is one too).
    fan_in_fan_out: bool
    magnitude: torch.Tensor | None = None  # DoRA: one learned norm per output feature
    # VeRA: A is the shared projection, as wide as the widest adapted layer; a layer uses its first
    # in_features columns (see fitted_to).
    shared_width: bool = False

    def delta_shape(self) -> tuple[int, int]:
        out, inp = self.B.shape[0], self.A.shape[1]
        return (inp, out) if self.fan_in_fan_out else (out, inp)

    def fitted_to(self, shape: tuple[int, ...]) -> LoraFactors:
        """These factors for a base tensor of `shape`: a shared-width A cut to the layer's input width."""
        if not self.shared_width:
            return self
        inp = shape[0] if self.fan_in_fan_out else shape[-1]
        return replace(self, A=self.A[:, :inp], shared_width=False)


@dataclass
class TensorUpdate:
    """What the adapter does to one base tensor: replace it, add a LoRA delta, or both (in that order)."""

    replacement: torch.Tensor | None = None
    lora: LoraFactors | None = None
    added: torch.Tensor | None = None  # lora_B.bias * scaling, added to the base bias (lora_bias=True)
    sources: list[str] = field(default_factory=list)  # adapter keys, for error messages

    def result_shape(self, base_shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(self.replacement.shape) if self.replacement is not None else base_shape


@dataclass
class Adapter:
    path: Path
    config: dict[str, Any]
    updates: dict[str, TensorUpdate]  # base tensor name -> update

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def update_adapter_config(folder: Path, **changes: Any) -> None:
    """Change keys of adapter_config.json in an adapter folder being written (a staging folder that no
    reader sees yet, so no atomic rename is needed), in PEFT's own layout."""
    path = folder / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps({**config, **changes}, indent=2, sort_keys=True), encoding="utf-8")


def check_adapter_files(path: Path) -> dict[str, Any]:
    """Check that an adapter directory's two files are whole before any library reads them, and return the
    config. Without this a garbage adapter_config.json ends in a bare JSONDecodeError or KeyError inside
    PEFT, and a truncated adapter_model.safetensors in safetensors' "incomplete metadata"; both name no file.
    Called where every command finds its adapter: merge.find_adapter (merge, combine, export, generate and
    chat --adapter) and target.resolve_target (generate, chat and eval of a run directory)."""
    config_path = path / ADAPTER_CONFIG
    hint = "the adapter directory is damaged: train again, or restore it from a copy"
    try:
        config = json.loads(config_path.read_bytes())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise LoratoolError(f"{config_path}: cannot read the adapter's config: {exc}", hint=hint) from None
    if not isinstance(config, dict):
        raise LoratoolError(
            f"{config_path}: the adapter's config is a JSON {type(config).__name__}, not an object", hint=hint
        )
    if not isinstance(config.get("peft_type"), str):
        raise LoratoolError(f"{config_path}: no peft_type: this is not a PEFT adapter config", hint=hint)
    check_safetensors_file(path / ADAPTER_WEIGHTS, hint)
    return config


def check_safetensors_file(path: Path, hint: str) -> None:
    """Refuse a .safetensors file whose header cannot be read or whose size is not the one its header
    describes (a copy or a save cut short): 8 bytes of header length, the JSON header, then the tensor data
    up to the largest data_offsets end."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length)) if 8 <= size and 8 + length <= size else None
    except (OSError, ValueError) as exc:
        raise LoratoolError(f"{path}: not a readable safetensors file: {exc}", hint=hint) from None
    if header is None:
        raise LoratoolError(f"{path}: truncated: {size} bytes, shorter than its own header says", hint=hint)
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise LoratoolError(
            f"{path}: not a safetensors file (its header lists no tensors)", hint=hint
        ) from None
    expected = 8 + length + end
    if size != expected:
        state = "truncated" if size < expected else "longer than its tensors"
        raise LoratoolError(f"{path}: {state}: {size} bytes, its header describes {expected}", hint=hint)


def read_adapter(path: Path) -> Adapter:
    """Read and check a PEFT LoRA adapter directory (config + weights), all tensors kept in float32."""
    from safetensors.torch import load_file

    config = check_adapter_files(path)
    check_supported(config, path)
    tensors = load_file(str(path / ADAPTER_WEIGHTS))
    return Adapter(path, config, updates_from(tensors, config))


def check_supported(config: dict[str, Any], path: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type not in FOLDED_TYPES:
        raise LoratoolError(
            f"{path / ADAPTER_CONFIG}: peft_type is {peft_type!r}; loratool merge folds "
            f"{', '.join(FOLDED_TYPES)} adapters only",
            hint="merge other adapter types with PEFT: PeftModel.from_pretrained(base, adapter)."
            "merge_and_unload()",
        )
    if peft_type == "VERA" and not config.get("save_projection", True):
        raise LoratoolError(
            f"{path / ADAPTER_CONFIG}: a VeRA adapter saved without its shared projections "
            "(save_projection: false); loratool merge reads them from the adapter file",
            hint="save the adapter again with VeraConfig(save_projection=True), or merge it with PEFT: "
            "PeftModel.from_pretrained(base, adapter).merge_and_unload()",
        )
    used = [f"{key} ({what})" for key, what in _UNSUPPORTED_FIELDS.items() if config.get(key)]
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        used.append(f"init_lora_weights={init} (rewrites the base weights when the adapter is created)")
    if used:
        raise LoratoolError(
            f"{path / ADAPTER_CONFIG}: the adapter uses {', '.join(used)}, which loratool merge does not "
            "fold",
            hint="merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload()",
        )


def updates_from(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, TensorUpdate]:
    """Group adapter tensors by the base tensor they change."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # module -> {lora_A: ..., lora_B: ..., ...}
    updates: dict[str, TensorUpdate] = {}
    shared = {k: tensors[k].float() for k in VERA_PROJECTIONS if k in tensors}  # VeRA's vera_A, vera_B
    for key, tensor in tensors.items():
        if key in VERA_PROJECTIONS:
            continue
        name = key.removeprefix(PREFIX)
        lora = _LORA_KEY.match(name)
        if lora:
            kind = lora["kind"] + (".bias" if lora["param"] == "bias" else "")
            pairs.setdefault(lora["module"], {})[kind] = tensor.float()
            continue
        if "lora_" in name:
            raise LoratoolError(
                f"adapter tensor {key} is not a LoRA tensor loratool understands",
                hint="merge it with PEFT itself: PeftModel.from_pretrained(base, adapter).merge_and_unload()",
            )
        copy = _COPY_KEY.match(name)
        target = f"{copy['module']}.{copy['param']}" if copy else name
        update = updates.setdefault(target, TensorUpdate())
        update.replacement = tensor.float()
        update.sources.append(key)

    for module, parts in pairs.items():
        if config.get("peft_type") == "VERA":
            factors = _vera_factors(module, parts, shared, config)
        elif config.get("peft_type") == "ADALORA":
            factors = _adalora_factors(module, parts, config)
        else:
            factors = _factors(module, parts, config)
        weight = updates.setdefault(f"{module}.weight", TensorUpdate())
        weight.lora = factors
        weight.sources.append(f"{PREFIX}{module}.lora_*")
        if "lora_B.bias" in parts:
            bias = updates.setdefault(f"{module}.bias", TensorUpdate())
            bias.added = parts["lora_B.bias"] * factors.scaling
            bias.sources.append(f"{PREFIX}{module}.lora_B.bias")
    return updates


def _factors(module: str, parts: dict[str, torch.Tensor], config: dict[str, Any]) -> LoraFactors:
    from peft.utils.other import get_pattern_key  # the matching PEFT itself uses for rank/alpha_pattern

    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_key not in parts or b_key not in parts:
        missing = a_key if a_key not in parts else b_key
        raise LoratoolError(
            f"the adapter has no {missing} for {module} (only {', '.join(sorted(parts))})",
            hint="the adapter file is incomplete; save it again with PeftModel.save_pretrained",
        )
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    A, B = parts[a_key], parts[b_key]
    if A.shape[0] != r or B.shape[1] != r:
        raise LoratoolError(
            f"{module}: adapter_config.json says rank {r}, but lora_A is {tuple(A.shape)} and lora_B is "
            f"{tuple(B.shape)}",
            hint="adapter_config.json does not belong to these weights (r / rank_pattern)",
        )
    # rsLoRA (use_rslora) scales by alpha / sqrt(r), which keeps the update's size stable as r grows.
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraFactors(
        A=A,
        B=B,
        scaling=scaling,
        fan_in_fan_out=embedding or bool(config.get("fan_in_fan_out")),
        magnitude=parts.get("lora_magnitude_vector"),
    )


def _adalora_factors(module: str, parts: dict[str, torch.Tensor], config: dict[str, Any]) -> LoraFactors:
    """AdaLoRA's SVD triplet as a LoRA pair (peft/tuners/adalora/layer.py `SVDLinear.get_delta_weight`):
    B @ (A * E) * scaling / (ranknum + 1e-5). ranknum stays the starting rank init_r after PEFT cuts a
    layer to the rank it kept; scaling is lora_alpha (or, with lora_alpha 0, the layer's rank)."""
    missing = [k for k in ("lora_A", "lora_B", "lora_E") if k not in parts]
    if missing:
        raise LoratoolError(
            f"the AdaLoRA adapter has no {', '.join(missing)} for {module} (only {', '.join(sorted(parts))})",
            hint="the adapter file is incomplete; save it again with PeftModel.save_pretrained",
        )
    A, B, E = parts["lora_A"], parts["lora_B"], parts["lora_E"]
    rank = A.shape[0]
    if B.shape[1] != rank or tuple(E.shape) != (rank, 1):
        raise LoratoolError(
            f"{module}: AdaLoRA factors of different ranks: lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, "
            f"lora_B {tuple(B.shape)}",
            hint="the adapter file is damaged; save it again with PeftModel.save_pretrained",
        )
    alpha = config.get("lora_alpha", 8)
    ranknum = float(config.get("init_r", 12))
    scaling = (alpha if alpha > 0 else float(rank)) / (ranknum + 1e-5)
    return LoraFactors(A=A * E, B=B, scaling=scaling, fan_in_fan_out=bool(config.get("fan_in_fan_out")))


def _vera_factors(
    module: str, parts: dict[str, torch.Tensor], shared: dict[str, torch.Tensor], config: dict[str, Any]
) -> LoraFactors:
    """VeRA's layer as a LoRA pair (peft/tuners/vera/layer.py `Linear.get_delta_weight`):
    (lambda_b * B[:out]) @ (lambda_d * A[:, :in]); A is cut to the layer's width by `fitted_to`."""
    missing = [k for k in ("vera_lambda_b", "vera_lambda_d") if k not in parts]
    missing += [k.removeprefix("base_model.") for k in VERA_PROJECTIONS if k not in shared]
    if missing:
        raise LoratoolError(
            f"the VeRA adapter has no {', '.join(missing)} for {module}",
            hint="save it again with PeftModel.save_pretrained and VeraConfig(save_projection=True)",
        )
    lambda_b, lambda_d = parts["vera_lambda_b"], parts["vera_lambda_d"]
    A, B = shared[VERA_PROJECTIONS[0]], shared[VERA_PROJECTIONS[1]]
    if A.shape[0] != lambda_d.shape[0] or B.shape[1] != lambda_d.shape[0] or B.shape[0] < lambda_b.shape[0]:
        raise LoratoolError(
            f"{module}: VeRA vectors do not fit the shared projections: lambda_d {tuple(lambda_d.shape)}, "
            f"lambda_b {tuple(lambda_b.shape)}, vera_A {tuple(A.shape)}, vera_B {tuple(B.shape)}",
            hint="adapter_config.json does not belong to these weights (r)",
        )
    return LoraFactors(
        A=lambda_d.unsqueeze(-1) * A,
        B=lambda_b.unsqueeze(-1) * B[: lambda_b.shape[0]],
        scaling=1.0,
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        shared_width=True,
    )


def check_against_base(updates: dict[str, TensorUpdate], base_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse, before anything is written, an adapter made for another architecture or size."""
    unknown = [name for name in updates if name not in base_shapes]
    if unknown:
        first = updates[unknown[0]].sources[0]
        raise LoratoolError(
            f"the adapter changes {len(unknown)} tensor(s) the base model does not have, e.g. {unknown[0]} "
            f"(from {first}); the base has e.g. {', '.join(list(base_shapes)[:3])}",
            hint="the adapter was trained on another architecture: pass the right model as --base",
        )
    for name, update in updates.items():
        shape = base_shapes[name]
        if update.replacement is not None and tuple(update.replacement.shape) != shape:
            _shape_error(name, shape, tuple(update.replacement.shape), "full copy")
        result = update.result_shape(shape)
        if update.lora is not None:
            f = update.lora.fitted_to(result)
            if f.delta_shape() != result:
                _shape_error(name, result, f.delta_shape(), "LoRA update (B @ A)")
            out = f.B.shape[0]
            if f.magnitude is not None and tuple(f.magnitude.shape) != (out,):
                _shape_error(name, result, tuple(f.magnitude.shape), "DoRA magnitude")
        if update.added is not None and tuple(update.added.shape) != result:
            _shape_error(name, result, tuple(update.added.shape), "LoRA bias")


def _shape_error(name: str, base: tuple[int, ...], adapter: tuple[int, ...], what: str) -> None:
    raise LoratoolError(
        f"shape mismatch for {name}: the base model has {list(base)}, the adapter's {what} is "
        f"{list(adapter)}",
        hint="the adapter was trained on a model of another size (hidden size, vocabulary): pass the right "
        "model as --base",
    )


def lora_delta(f: LoraFactors) -> torch.Tensor:
    """scaling * B @ A in the base weight's layout — PEFT's get_delta_weight, same operation order."""
    product = (f.B @ f.A).mul_(f.scaling)  # in place: one (out, in) tensor, not two
    return product.T if f.fan_in_fan_out else product


def fold(weight: torch.Tensor, update: TensorUpdate) -> torch.Tensor:
    """The merged value of one base tensor, in float32. Changes `weight` in place when it is already
    float32: the caller passes a tensor it read for this purpose, and the merge then holds two tensors of
    the weight's size (the weight and the delta) rather than three."""
    import torch

    if update.replacement is not None:
        merged = update.replacement.clone()  # the adapter's copy stays as it is
    else:
        merged = weight.float()
    if update.lora is not None:
        f = update.lora.fitted_to(tuple(merged.shape))
        merged += lora_delta(f)
        if f.magnitude is not None:
            # DoRA: W' = m / ||W + dW|| * (W + dW), the norm taken per output feature (over the input
            # dimension of the weight in (out, in) layout) on the unmerged base, as PEFT's merge does.
            norm = torch.linalg.norm(merged.T if f.fan_in_fan_out else merged, dim=1)
            factor = (f.magnitude / norm).view(-1, 1)
            merged *= factor.T if f.fan_in_fan_out else factor
    if update.added is not None:
        merged += update.added
    return merged
