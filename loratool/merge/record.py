"""merge.json, typed: what `loratool merge` folded into what, how, and whether the result was verified.

merge writes it (run.py, through rundir.outputs `Output.place`, which adds loratool's marker and the list of
files), and every reader — export, generate, eval — reads it back through `MergeRecord.read`, which checks
that marker. The JSON keeps the names and order of the fields below; a key this version does not know
(a newer loratool's) is kept in `raw`, and a value of the wrong type reads as absent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loratool.rundir.outputs import RECORD_OF_KIND, known_fields, owned_record

KIND = "merge"
RECORD = RECORD_OF_KIND[KIND]  # merge.json


@dataclass(frozen=True)
class MergedAdapter:
    """The adapter that was folded in (merge.json "adapter")."""

    path: str | None = None
    loratool_run: bool = False  # it is a loratool run directory (run.json, recipe.yaml)
    r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    base_model_name_or_path: str | None = None


@dataclass(frozen=True)
class MergedBase:
    """The base it was folded into (merge.json "base_model"), and how its identity was checked."""

    id: str | None = None  # what the run (or --base) calls it
    path: str | None = None  # the local directory that was read
    fingerprint: str | None = None  # of the weights that were read
    recorded_fingerprint: str | None = None  # the run's (run.json), None for an adapter from another tool
    fingerprint_check: str | None = None  # match, not recorded, mismatch merged with --force, ...


@dataclass(frozen=True)
class MergeRecord:
    """merge.json, as written and as read back."""

    status: str | None = None  # complete, or failed-verification
    loratool_version: str | None = None
    created_at: str | None = None
    adapter: MergedAdapter = field(default_factory=MergedAdapter)
    base_model: MergedBase = field(default_factory=MergedBase)
    dtype: str | None = None  # of the merged weights
    qlora: dict[str, Any] | None = None  # a QLoRA merge: the base policy and how the base was quantized
    tensors: dict[str, int] = field(default_factory=dict)  # merged, from_base
    versions: dict[str, str | None] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)  # merge/verify.py's results, or skipped
    wall_time_s: float | None = None
    files: list[str] = field(default_factory=list, compare=False)  # read back only: written by outputs
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the object as read

    def to_dict(self) -> dict[str, Any]:
        """The JSON object merge.json holds (loratool's marker and "files" are added when it is written)."""
        value = asdict(self)
        del value["files"], value["raw"]
        return value

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> MergeRecord:
        known = known_fields(cls, value)
        known["adapter"] = MergedAdapter(**known_fields(MergedAdapter, value.get("adapter")))
        known["base_model"] = MergedBase(**known_fields(MergedBase, value.get("base_model")))
        for name in ("tensors", "versions", "verification"):
            known[name] = _dict(known.get(name))
        known["qlora"] = known.get("qlora") if isinstance(known.get("qlora"), dict) else None
        known["files"] = list(known.get("files") or [])
        return cls(**known, raw=value)

    @classmethod
    def read(cls, folder: Path) -> MergeRecord | None:
        """merge.json of the `loratool merge` output in `folder`, or None when `folder` is not one (no
        merge.json, or one without loratool's marker)."""
        value = owned_record(folder, RECORD, KIND)
        return cls.from_dict(value) if value is not None else None

    @property
    def complete(self) -> bool:
        return self.status == "complete"


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
