"""Reading a recipe: YAML text -> raw mapping -> `extends:` bases merged under it -> `--set` overrides ->
unknown-key walk -> the schema -> the cross-field rules -> one error listing every problem.

Where each value came from (a file and line, a --set, or the default) is kept alongside, for
`train --explain`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from loratool.errors import LoratoolError
from loratool.recipe.library_fields import LORA_CONFIG_FIELDS, SFT_CONFIG_FIELDS
from loratool.recipe.rules import cross_field_problems
from loratool.recipe.schema import (
    MOVED_KEYS,
    RESERVED_LORA_KEYS,
    RESERVED_TRAINING_KEYS,
    LoraSection,
    Recipe,
    TrainingSection,
    number_problem,
    section_models,
)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file. Raises LoratoolError listing every problem."""
    return load_recipe_with_origins(path, overrides)[0]


# Where a value of the recipe came from: "recipes/base.yaml:12", "--set lora.r=8"; absent = the default.
Origins = dict[str, str]


def load_recipe_with_origins(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Recipe, Origins]:
    """load_recipe, and for each key path given (`lora.r`, `data.train.0.path`) the file and line or the
    --set that set it. `extends:` chains are followed and deep-merged first; --set applies last."""
    path = Path(path)
    raw, duplicates, origins = _read_with_bases(path, chain=())
    for override in overrides:
        apply_override(raw, override, origins)
    recipe = validate_recipe(raw, source=str(path), problems=duplicates)
    recipe._directory = path.parent.resolve()
    return recipe, origins


def _read_with_bases(path: Path, chain: tuple[Path, ...]) -> tuple[dict[str, Any], list[str], Origins]:
    """One recipe file merged onto the files it extends: (raw mapping, duplicate-key problems, origins)."""
    raw, duplicates, lines = _read_one(path)
    if chain:  # a base file: its problems name it
        duplicates = [f"{path}: {problem}" for problem in duplicates]
    origins = {key: f"{path}:{line}" for key, line in lines.items() if not key.startswith("extends")}
    _resolve_relative_paths(raw, path.parent)
    base = raw.pop("extends", None)
    if base is None:
        return raw, duplicates, origins
    if not isinstance(base, str) or not base.strip():
        raise LoratoolError(
            f"{path}:{lines.get('extends', 1)}: extends must be the path of one base recipe, got {base!r}",
            hint="for example `extends: base.yaml` (relative to this recipe's directory)",
        )
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = Path(os.path.normpath(path.parent / base_path))  # sub/../base.yaml -> base.yaml
    here = (*chain, path)
    if any(_same_file(base_path, seen) for seen in here):
        cycle = " -> ".join(str(p) for p in (*here, base_path))
        raise LoratoolError(
            f"{path}: `extends` makes a cycle: {cycle}",
            hint="a recipe cannot extend itself or a recipe that extends it; remove one `extends`",
        )
    if base_path.is_dir():
        inside = sorted(base_path.glob("*.yaml"))
        example = f"{base.rstrip('/')}/{inside[0].name if inside else 'base.yaml'}"
        raise LoratoolError(
            f"{path}:{lines.get('extends', 1)}: extends {base!r} is a directory ({base_path}), not a recipe "
            "file",
            hint=f"give the path of one recipe file, e.g. `extends: {example}`",
        )
    if not base_path.is_file():
        raise LoratoolError(
            f"{path}:{lines.get('extends', 1)}: extends {base!r}: no such recipe file ({base_path})",
            hint="the path is relative to the directory of the recipe that extends it",
        )
    base_raw, base_duplicates, base_origins = _read_with_bases(base_path, here)
    unset: list[str] = []
    merged = _deep_merge(base_raw, raw, base_origins, "", unset)
    for key_path in unset:
        origins[key_path] = f"default (unset at {origins[key_path]})"
    return merged, base_duplicates + duplicates, {**base_origins, **origins}


def _read_one(path: Path) -> tuple[dict[str, Any], list[str], dict[str, int]]:
    """One YAML file -> (mapping, duplicate-key problems, 1-based line of every key path)."""
    source = str(path)
    try:
        loader = RecipeLoader(_read_recipe_text(path), source)
        try:
            raw = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise LoratoolError(
            f"{where}: YAML syntax error: {problem}",
            hint="check indentation and quoting around that line",
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise LoratoolError(
            f"{path}: a recipe must be a YAML mapping of sections, got a {type(raw).__name__}",
            hint="start from one of the files in recipes/",
        )
    return raw, loader.duplicate_keys, loader.key_lines


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return a.resolve() == b.resolve()


def _deep_merge(
    base: dict[str, Any], child: dict[str, Any], origins: Origins, prefix: str, unset: list[str]
) -> dict[str, Any]:
    """child over base, key by key (see _put); the key paths null sent back to their default are added to
    `unset`."""
    merged = dict(base)
    for key, value in child.items():
        _put(merged, key, value, origins, f"{prefix}{key}", unset)
    return merged


def _put(
    mapping: dict[str, Any], key: str, value: Any, origins: Origins, path: str, unset: list[str]
) -> None:
    """Lay one value over mapping[key], as a recipe over the one it extends and a --set over the recipe:
    mappings merge key by key; lists and values replace (their old origins go); null for a key that cannot
    be null removes the value, so the key is back to its default."""
    if isinstance(value, dict):  # merged key by key, also onto nothing: its nulls unset keys there too
        under = mapping.get(key)
        if not isinstance(under, dict):
            _forget_under(origins, path)
            under = {}
        mapping[key] = _deep_merge(under, value, origins, f"{path}.", unset)
        return
    _forget_under(origins, path)
    if value is None and _null_means_default(path):
        mapping.pop(key, None)
        unset.append(path)
    else:
        mapping[key] = value


def _null_means_default(key_path: str) -> bool:
    """Whether the key path names a schema field that cannot be null. A field that can (quantization,
    training.save_total_limit) takes the null as its value, and so does a key the schema does not know (a
    pass-through library field, or a typo that validation will name)."""
    field = _schema_field(key_path)
    return field is not None and type(None) not in (field.annotation, *get_args(field.annotation))


def _schema_field(key_path: str) -> FieldInfo | None:
    """The schema field a key path (`lora.r`, `data.train.0.path`) names; None for anything else (a list
    item, a key inside a mapping field, an unknown key)."""
    models: list[type[BaseModel]] = [Recipe]
    field: FieldInfo | None = None
    for key in key_path.split("."):
        if key.isdigit() and field is not None and _holds_list(field.annotation):
            field = None  # the item of a list of sections: its keys are the section's fields
            continue
        field = next((m.model_fields[key] for m in models if key in m.model_fields), None)
        if field is None:
            return None
        models = section_models(field.annotation)
    return field


def _holds_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(_holds_list(arg) for arg in get_args(annotation))


def _forget_under(origins: Origins, path: str) -> None:
    for key in [k for k in origins if k == path or k.startswith(f"{path}.")]:
        del origins[key]


def _leaf_paths(value: Any, prefix: str) -> list[str]:
    """Every key path inside a value (a section given to --set, a list of sources)."""
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return []
    paths = []
    for key, sub in items:
        paths += [f"{prefix}.{key}", *_leaf_paths(sub, f"{prefix}.{key}")]
    return paths


def explain(recipe: Recipe, origins: Origins) -> str:
    """The resolved recipe as YAML, each value followed by a comment saying where it came from: a file and
    line, a --set, or `default`. Itself a valid recipe."""
    lines: list[tuple[str, str]] = []

    def scalar(value: Any) -> str:
        text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6).strip()
        return text.removesuffix("\n...").strip()

    def origin(path: str) -> str:
        return origins.get(path, "default")

    def walk(value: dict[str, Any], prefix: str, indent: str, first: str | None = None) -> None:
        for i, (key, sub) in enumerate(value.items()):
            lead = first if (first is not None and i == 0) else indent
            path = f"{prefix}{key}"
            if isinstance(sub, dict) and sub:
                lines.append((f"{lead}{key}:", ""))
                walk(sub, f"{path}.", indent + "  ")
            elif isinstance(sub, list) and sub and all(isinstance(x, dict) for x in sub):
                lines.append((f"{lead}{key}:", ""))
                for n, item in enumerate(sub):
                    walk(item, f"{path}.{n}.", indent + "    ", first=f"{indent}  - ")
            else:
                lines.append((f"{lead}{key}: {scalar(sub)}", origin(path)))

    walk(recipe_to_dict(recipe), "", "")
    # Comments line up in one column; a longer line keeps two spaces before its `#`, so that the output
    # still reads as YAML (`value# x` would be part of the value).
    width = min(max(len(text) for text, _ in lines), 60)
    return "\n".join(f"{text:<{width}}  # {where}" if where else text for text, where in lines)


def _read_recipe_text(path: Path) -> str:
    """The recipe file as text, or a LoratoolError saying why it cannot be one."""
    if path.is_dir():
        raise LoratoolError(
            f"{path} is a directory, not a recipe file",
            hint="pass the path of a YAML recipe inside it, e.g. recipes/tiny-smoke.yaml",
        )
    if not path.is_file():
        raise LoratoolError(
            f"recipe file not found: {path}",
            hint="pass the path of a YAML recipe, e.g. recipes/tiny-smoke.yaml",
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoratoolError(f"{path}: cannot read the recipe: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LoratoolError(
            f"{path}:{line}: the recipe is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            hint="save the file as UTF-8 (most editors: 'save with encoding'), or check that it is a recipe",
        ) from None


# Aliases (`*name`) may add at most this many YAML nodes to a document on top of the ones written out. A
# recipe reuses a data source or a module list at most (tens of nodes); nine nested aliases of nine items
# each ("billion laughs") would expand to 9**9 nodes, a recursive alias to infinitely many, and validation
# walks every one of them. Counting stops at the limit, so refusing costs at most this many steps.
MAX_ALIAS_NODES = 10_000


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no Python tags, same types) that also checks the node graph before building
    anything: every repeated key is collected in `duplicate_keys` (PyYAML would keep the last silently),
    and a document whose aliases expand past MAX_ALIAS_NODES is refused."""

    def __init__(self, stream: str, source: str):
        super().__init__(stream)
        self.source = source
        self.duplicate_keys: list[str] = []
        self.key_lines: dict[str, int] = {}  # "lora.r" -> 1-based line of the key, for --explain

    def construct_document(self, node: yaml.Node) -> Any:
        self.duplicate_keys = self._check(node)
        return super().construct_document(node)

    def _check(self, root: yaml.Node) -> list[str]:
        """One walk over the document as it would expand: duplicate keys of each mapping (once per mapping,
        with the path it was first reached by), and the count of nodes that aliases add."""
        problems: list[str] = []
        seen: set[int] = set()
        repeated = 0
        stack: list[tuple[yaml.Node, str]] = [(root, "")]
        while stack:
            node, path = stack.pop()
            first_visit = id(node) not in seen
            if first_visit:
                seen.add(id(node))
            else:  # reached again through an alias: one more node in the expanded document
                repeated += 1
                if repeated > MAX_ALIAS_NODES:
                    raise LoratoolError(
                        f"{self.source}: YAML aliases expand this document past {MAX_ALIAS_NODES:,} extra "
                        "values (nested or recursive `*alias` references); refused before building it",
                        hint="write the values out, or use aliases only for a few small repeated parts",
                    )
            if isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    self.key_lines.setdefault(f"{path}{i}", item.start_mark.line + 1)
                children = [(item, f"{path}{i}.") for i, item in enumerate(node.value)]
                stack.extend(reversed(children))  # depth first in document order: paths as first written
            elif isinstance(node, yaml.MappingNode):
                if first_visit:
                    problems += self._duplicates(node, path)
                children = []
                for key, value in node.value:
                    name = key.value if isinstance(key, yaml.ScalarNode) else "?"
                    self.key_lines.setdefault(f"{path}{name}", key.start_mark.line + 1)
                    children += [(key, path), (value, f"{path}{name}.")]
                stack.extend(reversed(children))
        return problems

    def _duplicates(self, node: yaml.MappingNode, path: str) -> list[str]:
        marks: dict[Any, list[yaml.Mark]] = {}
        shown: dict[Any, str] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys merge by design; complex keys do not occur in recipes
            value = self.construct_object(key)  # `lora`, "lora" and 'lora' are the same key
            marks.setdefault(value, []).append(key.start_mark)
            shown[value] = key.value
        problems = []
        for value, found in marks.items():
            if len(found) > 1:
                times = "twice" if len(found) == 2 else f"{len(found)} times"
                # One line (a flow mapping such as --set lora={r: 8, r: 16}): the columns tell them apart.
                one_line = len({m.line for m in found}) == 1
                at = [m.column + 1 if one_line else m.line + 1 for m in found]
                where = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
                unit = "columns" if one_line else "lines"
                problems.append(f"{path}{shown[value]}: key given {times} ({unit} {where}) — keep one")
        return problems


def parse_yaml(text: str, source: str) -> tuple[Any, list[str]]:
    """YAML text -> (data, one message per duplicated key). A syntax error raises yaml.YAMLError; an alias
    bomb, LoratoolError."""
    loader = RecipeLoader(text, source)
    try:
        return loader.get_single_data(), loader.duplicate_keys
    finally:
        loader.dispose()


def validate_recipe(
    raw: dict[str, Any], source: str = "recipe", problems: list[str] | tuple[str, ...] = ()
) -> Recipe:
    """Validate a raw recipe mapping, reporting unknown keys, wrong types and cross-field rules together
    (with `problems` already found, such as duplicated keys)."""
    problems = [*problems, *unknown_key_problems(raw, Recipe, prefix="")]
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += _describe_all([err for err in exc.errors() if err["type"] != "extra_forbidden"])
        recipe = None
    if recipe is not None:
        problems += cross_field_problems(recipe)
    if problems:
        lines = "\n".join(f"  - {p}" for p in dict.fromkeys(problems))
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise LoratoolError(
            f"{source}: {count} in the recipe:\n{lines}",
            hint="fix the keys above; `loratool recipe-reference` lists every valid key with its meaning",
        )
    assert recipe is not None
    return recipe


def _describe_all(errors: list[Any]) -> list[str]:
    """One line per key path. A union type (list of sources | fraction) fails once per alternative:
    those failures are joined into one line rather than shown as contradicting lines."""
    by_path: dict[str, list[Any]] = {}
    for err in errors:
        by_path.setdefault(_key_path(err["loc"]), []).append(err)
    lines = []
    for path, errs in by_path.items():
        if any(other.startswith(f"{path}.") for other in by_path):
            # the value matched a union's list or mapping type, and a line below names what is wrong
            # inside it; "expected a number" from the union's other type would only contradict it
            continue
        if any(e["type"] == "missing" for e in errs):
            lines.append(f"{path}: required key is missing")
            continue
        if errs[0]["type"] == "value_error":
            lines.append(f"{path}: {errs[0]['msg'].removeprefix('Value error, ')}")
            continue
        # pydantic's own refusals of .inf / nan in a float and of 1.0e+30 (or the text 1e30, which YAML
        # does not read as a number) in an int: say it as the schema's range check does. A union is tried
        # as several types and fails on each; one line says why.
        numbers = [
            e["input"] for e in errs if e["type"] in ("finite_number", "int_parsing_size", "int_parsing")
        ]
        problem = number_problem(_as_number(numbers[0])) if numbers else None
        if problem:
            lines.append(f"{path}: {problem}")
            continue
        wanted = " or ".join(dict.fromkeys(e["msg"].removeprefix("Input should be ") for e in errs))
        value = errs[0].get("input")
        shown = repr(value) if len(repr(value)) < 60 else type(value).__name__
        lines.append(f"{path}: expected {wanted} (got {shown})")
    return lines


def _as_number(value: Any) -> Any:
    """A number given as YAML text that is not a YAML number (`1e400`: YAML wants a dot) as a float."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _key_path(loc: tuple[Any, ...]) -> str:
    # pydantic adds the tried type to the location of union members (`list[DataSource]`, `float`,
    # `constrained-float`...); the user only needs the key path, which is made of names and list indices.
    keys = [str(p) for p in loc if isinstance(p, int) or p.isidentifier()]
    known = {"str", "int", "float", "bool", "list", "dict"}
    return ".".join(k for k in keys if k not in known)


def unknown_key_problems(raw: Any, model: type[BaseModel], prefix: str) -> list[str]:
    """Walk a raw mapping against the schema; one message per unknown key, with the closest valid key."""
    if not isinstance(raw, dict):
        return []
    fields = model.model_fields
    problems = []
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key in fields:
            for sub in section_models(fields[key].annotation):
                if isinstance(value, list):
                    for i, item in enumerate(value):
                        problems += unknown_key_problems(item, sub, f"{path}.{i}.")
                else:
                    problems += unknown_key_problems(value, sub, f"{path}.")
            continue
        message = _unknown_key_message(str(key), model, prefix)
        if message:
            problems.append(message)
    return problems


def _unknown_key_message(key: str, model: type[BaseModel], prefix: str) -> str:
    path = f"{prefix}{key}"
    if model is TrainingSection:
        if key in MOVED_KEYS:
            return f"{path}: belongs in {MOVED_KEYS[key]}, not in training"
        if key in RESERVED_TRAINING_KEYS:
            return f"{path}: set by loratool from the rest of the recipe — remove it"
        if key in SFT_CONFIG_FIELDS:
            return ""  # a valid SFTConfig field loratool passes through untouched
    if model is LoraSection:
        if key in RESERVED_LORA_KEYS:
            return f"{path}: set by loratool — remove it"
        if key in LORA_CONFIG_FIELDS:
            return ""
    candidates = list(model.model_fields)
    if model is TrainingSection:
        candidates += sorted(SFT_CONFIG_FIELDS - RESERVED_TRAINING_KEYS - set(MOVED_KEYS))
    if model is LoraSection:
        candidates += sorted(LORA_CONFIG_FIELDS - RESERVED_LORA_KEYS)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown key — did you mean {prefix}{close[0]}?"
    elsewhere = _section_owning(key)
    if elsewhere:
        return f"{path}: unknown key here — it belongs in {elsewhere}"
    return f"{path}: unknown key (valid keys here: {', '.join(model.model_fields)})"


def _section_owning(key: str) -> str | None:
    for name, field in Recipe.model_fields.items():
        for sub in section_models(field.annotation):
            if key in sub.model_fields:
                return f"{name}.{key}"
    return None


def apply_override(raw: dict[str, Any], override: str, origins: Origins | None = None) -> None:
    """Apply one `--set key.path=value`; the value is parsed as YAML (numbers, booleans, [lists],
    {mappings}). It lays over the recipe as a recipe over the one it extends: a mapping merges into the
    mapping there (the keys given win, the others stay), null for a key that cannot be null sends it back
    to its default. `origins`, when given, then names this --set for every key it set."""
    key_path, sep, text = override.partition("=")
    if not sep or not key_path.strip():
        raise LoratoolError(
            f"--set {override!r}: expected KEY.PATH=VALUE",
            hint="for example --set training.learning_rate=1e-4 or --set data.train.0.path=my.jsonl",
        )
    value: Any = ""
    if text.strip():
        try:
            value, duplicates = parse_yaml(text, f"--set {override!r}")
        except yaml.YAMLError:
            value, duplicates = text, []
        if duplicates:
            raise LoratoolError(f"--set {override!r}: {'; '.join(duplicates)}")
    keys = key_path.strip().split(".")
    node: Any = raw
    for i, key in enumerate(keys[:-1]):
        where = ".".join(keys[: i + 1])
        if isinstance(node, list):
            node = _list_item(node, key, where, override)
            continue
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict | list):
            raise LoratoolError(f"--set {override!r}: {where} is a value, not a section")
    path, last, where = ".".join(keys), keys[-1], f"--set {override}"
    origins = {} if origins is None else origins
    unset: list[str] = []
    merges = isinstance(node, dict) and isinstance(value, dict) and isinstance(node.get(last), dict)
    if isinstance(node, list):
        index = _index(last, path, override, len(node))
        _forget_under(origins, path)
        node[index] = value
    else:
        _put(node, last, value, origins, path, unset)
    if not merges:
        origins[path] = where  # replaced whole; a merged mapping keeps the line it was written on
    for sub in _leaf_paths(value, path):
        origins[sub] = where
    for sub in unset:
        origins[sub] = f"default (unset by {where})"


def _list_item(node: list, key: str, where: str, override: str) -> Any:
    return node[_index(key, where, override, len(node))]


def _index(key: str, where: str, override: str, length: int) -> int:
    if not key.isdigit() or int(key) >= length:
        raise LoratoolError(
            f"--set {override!r}: {where} must index a list item (0 to {length - 1})",
            hint="lists are indexed by position, e.g. data.train.0.path",
        )
    return int(key)


def _resolve_relative_paths(raw: dict[str, Any], base: Path) -> None:
    """Make base_model, model.tokenizer, data and template paths relative to the recipe file, so a recipe works
    from any working directory.

    A relative path that does not exist next to the recipe is left as written: it may be relative to the
    working directory, or a hub id (org/name). training.output_dir stays relative to the working directory.
    """
    if "base_model" in raw:  # a recipe that extends another may leave it to its base
        raw["base_model"] = _next_to_recipe(raw["base_model"], base)
    if isinstance(raw.get("model"), dict) and "tokenizer" in raw["model"]:
        raw["model"]["tokenizer"] = _next_to_recipe(raw["model"]["tokenizer"], base)
    for method in ("grpo", "rloo"):  # a reward's Python file or reward-model run, next to the recipe
        rewards = raw[method].get("rewards") if isinstance(raw.get(method), dict) else None
        for reward in rewards if isinstance(rewards, list) else ():
            if isinstance(reward, dict):
                _resolve_reward_paths(reward, base)
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for split in ("train", "validation"):
        sources = data.get(split)
        if not isinstance(sources, list):
            continue
        for source in sources:
            if isinstance(source, dict) and isinstance(source.get("path"), str):
                source["path"] = _next_to_recipe(source["path"], base, absolute=False)
    template = data.get("chat_template")
    if isinstance(template, str) and template.endswith((".jinja", ".j2")) and (base / template).exists():
        data["chat_template"] = str(base / template)


def _resolve_reward_paths(reward: dict[str, Any], base: Path) -> None:
    """`function: file.py:name` and `model: RUN_DIR` of one reward, relative to the recipe file."""
    function = reward.get("function")
    if isinstance(function, str) and ":" in function:
        file, _, name = function.rpartition(":")
        reward["function"] = f"{_next_to_recipe(file, base)}:{name}"
    if "model" in reward:
        reward["model"] = _next_to_recipe(reward["model"], base)


def _next_to_recipe(value: Any, base: Path, *, absolute: bool = True) -> Any:
    """A relative path that exists next to the recipe (a directory `tiny`, `./tiny`, a file) as seen from
    there (absolute, or joined to the recipe's directory as given); anything else as written. `lexists`,
    not `exists`: a FIFO or a link loop there is still what the recipe names, and the input checks then say
    what it is; abspath, not resolve (a link loop would raise)."""
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return value
    candidate = base / value
    if not os.path.lexists(candidate):
        return value
    return os.path.abspath(candidate) if absolute else str(candidate)


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (every default filled in), as plain data for YAML."""
    return recipe.model_dump(mode="json")
