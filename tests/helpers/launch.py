"""What the launch-file tests of several tiers share: the cluster tools' own schemas (vendored in
tests/data/launch, see its README) as validators, and running a generated shell file with the cluster's
commands stubbed."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema

from conftest import TESTS

SCHEMAS = TESTS / "data" / "launch"


def _case_insensitive_enum(validator, enums, instance, schema):
    # SkyPilot's own keyword (sky/utils/validator.py), which plain JSON Schema does not know
    if isinstance(instance, str) and instance.lower() not in [e.lower() for e in enums]:
        yield jsonschema.ValidationError(f"{instance!r} is not one of {enums!r}")


def _case_sensitive_enum(validator, enums, instance, schema):
    if instance not in enums:
        yield jsonschema.ValidationError(f"{instance!r} is not one of {enums!r}")


# SkyPilot validates with Draft 7 plus these two keywords (sky/utils/validator.py get_schema_validator).
SkyPilotValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    validators={"case_insensitive_enum": _case_insensitive_enum, "case_sensitive_enum": _case_sensitive_enum},
)


def skypilot_schemas() -> dict[str, Any]:
    return json.loads((SCHEMAS / "skypilot-0.14.1-schemas.json").read_text())


def skypilot_problems(task: dict[str, Any]) -> list[str]:
    """Every way `task` breaks SkyPilot's schemas, as SkyPilot checks a task YAML: the task itself
    (Task.from_yaml_config), its resources (Resources.from_yaml_config) and each storage mount
    (Storage.from_yaml_config)."""
    schemas = skypilot_schemas()
    checks = [(schemas["task"], task)]
    if isinstance(task.get("resources"), dict):
        checks.append((schemas["resources"], task["resources"]))
    for mount in (task.get("file_mounts") or {}).values():
        if isinstance(mount, dict):
            checks.append((schemas["storage"], mount))
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for schema, value in checks
        for error in SkyPilotValidator(schema).iter_errors(value)
    ]


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as `kubectl apply --validate=strict` (the API server's
    strict field validation) refuses them; a CRD schema alone only prunes them, silently."""
    if isinstance(schema, dict):
        schema = {key: _strict(value) for key, value in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(value) for value in schema]
    return schema


def pytorchjob_problems(manifest: dict[str, Any]) -> list[str]:
    """Every way `manifest` breaks the PyTorchJob CRD's openAPI schema (Training Operator v1.9.0),
    unknown fields included."""
    vendored = json.loads((SCHEMAS / "pytorchjob-v1.9.0.schema.json").read_text())
    schema = _strict(copy.deepcopy(vendored["openAPIV3Schema"]))
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in jsonschema.Draft7Validator(schema).iter_errors(manifest)
    ]


def run_stubbed(script: Path, stubs: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `script` with bash after `stubs` (shell functions standing in for srun, scontrol, torchrun:
    each prints its arguments one per line), in a clean environment plus `env`."""
    clean = {"PATH": os.environ["PATH"], **(env or {})}
    return subprocess.run(
        ["bash", "-c", f'{stubs}\nsource "$0"', str(script)],
        capture_output=True,
        text=True,
        env=clean,
        timeout=30,
    )


PRINT_ARGS = 'printf "%s\\n" "$@"'


def torchrun_line(sbatch: str) -> str:
    """The torchrun command of an sbatch script's srun line (continuations joined), without srun."""
    joined = sbatch.replace("\\\n", " ")
    (line,) = [line for line in joined.splitlines() if line.startswith("srun ")]
    return line[line.index("torchrun ") :]
