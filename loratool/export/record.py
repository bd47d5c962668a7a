"""export.json, typed: what `loratool export` wrote (the GGUF file, its checksum, the Modelfile), from what,
and whether it was verified.

export writes it (run.py, through rundir.outputs `Output.place`, which adds loratool's marker and the list of
files); it is read back through `ExportRecord.read`, which checks that marker. `source.merge` is the
merge.json of the model that was converted, copied whole: the chain back to the run (adapter, base).
A key this version does not know is kept in `raw`, and a value of the wrong type reads as absent.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loratool.merge.record import MergeRecord
from loratool.rundir.outputs import RECORD_OF_KIND, known_fields, owned_record

KIND = "export"
RECORD = RECORD_OF_KIND[KIND]  # export.json


@dataclass(frozen=True)
class ExportSource:
    """What was exported (export.json "source")."""

    path: str | None = None  # SOURCE as given: a run directory, an adapter or a model directory
    kind: str | None = None  # run or model
    merge: MergeRecord | None = None  # merge.json of the model that was converted (None: a plain model)
    # gguf-lora: the base the adapter applies to: its name and the fingerprint check (as merge.json's base)
    base: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        # merge.json as it was read (marker and files included), so that the chain is what merge wrote.
        merge = None if self.merge is None else self.merge.raw or self.merge.to_dict()
        return {"path": self.path, "kind": self.kind, "merge": merge, "base": self.base}


@dataclass(frozen=True)
class ExportRecord:
    """export.json, as written and as read back."""

    status: str | None = None  # complete, or failed-verification
    loratool_version: str | None = None
    created_at: str | None = None
    source: ExportSource = field(default_factory=ExportSource)
    format: str | None = None  # gguf
    outtype: str | None = None  # f32, f16, bf16, q8_0
    file: str | None = None  # the GGUF file's name, in this directory
    bytes: int | None = None
    sha256: str | None = None
    modelfile: str | None = None  # the Ollama Modelfile's name (--ollama), else None
    versions: dict[str, str | None] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)  # export/verify.py's results, or skipped
    wall_time_s: float | None = None
    files: list[str] = field(default_factory=list, compare=False)  # read back only: written by outputs
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the object as read

    def to_dict(self) -> dict[str, Any]:
        """The JSON object export.json holds (loratool's marker and "files" are added when it is written)."""
        value = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("files", "raw")}
        return {**value, "source": self.source.to_dict()}

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ExportRecord:
        known = known_fields(cls, value)
        source = known_fields(ExportSource, value.get("source"))
        merge = source.get("merge")
        source["merge"] = MergeRecord.from_dict(merge) if isinstance(merge, dict) else None
        known["source"] = ExportSource(**source)
        for name in ("versions", "verification"):
            known[name] = known.get(name) if isinstance(known.get(name), dict) else {}
        known["files"] = list(known.get("files") or [])
        return cls(**known, raw=value)

    @classmethod
    def read(cls, folder: Path) -> ExportRecord | None:
        """export.json of the `loratool export` output in `folder`, or None when `folder` is not one."""
        value = owned_record(folder, RECORD, KIND)
        return cls.from_dict(value) if value is not None else None
