"""The package layout is the data flow: a stage imports only from the stages before it, and no module
imports itself back through others. Every import counts: module top, inside functions and under
TYPE_CHECKING."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "loratool"

# The flow, first to last. A module may import from its own stage and from earlier ones only.
STAGES = [
    ("loratool", "loratool.errors"),
    ("loratool.recipe",),
    ("loratool.model",),
    ("loratool.adapter",),
    ("loratool.data",),
    ("loratool.rundir",),
    ("loratool.train",),
    ("loratool.launch",),
    ("loratool.merge",),
    ("loratool.export",),
    ("loratool.generate",),
    ("loratool.eval",),
    ("loratool.serve",),
    ("loratool.smoke",),
    ("loratool.cli", "loratool.__main__"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> int:
    best, found = -1, None
    for index, prefixes in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} belongs to no stage: add it to STAGES in {__file__}"
    return found


def imports_of(path: Path, modules: set[str]) -> dict[str, int]:
    """loratool modules `path` imports -> the line of the first such import."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from loratool.model import hardware` imports the module loratool.model.hardware
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for target in targets:
            if target.startswith("loratool") and target != here:
                found.setdefault(target, node.lineno)
    return found


def graph() -> dict[str, dict[str, int]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def test_every_module_is_in_a_stage() -> None:
    for module in graph():
        stage_of(module)


def test_no_import_runs_back_up_the_flow() -> None:
    upward = [
        f"{module} (stage {STAGES[stage_of(module)][0]}) imports {target} (stage "
        f"{STAGES[stage_of(target)][0]}) at line {line}"
        for module, targets in graph().items()
        for target, line in targets.items()
        if stage_of(target) > stage_of(module)
    ]
    assert upward == []


def test_no_import_cycles() -> None:
    edges = graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in edges.get(node, {}):
            if target not in edges:
                continue  # a package face that resolved to a name, not a module
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif state.get(target) is None:
                visit(target, [*path, target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_checker_sees_a_cycle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cycle search above is real: two modules importing each other inside functions are found."""
    package = tmp_path / "loratool"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from loratool.b import g\n")
    (package / "b.py").write_text("def g():\n    from loratool import a\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", package)
    monkeypatch.setattr(f"{__name__}.STAGES", [("loratool",)])
    with pytest.raises(AssertionError, match="loratool.a"):
        test_no_import_cycles()


def test_imports_inside_functions_say_what_they_defer() -> None:
    """An import of a loratool module inside a function exists only to keep a heavy library (torch,
    transformers, ...) out of start-up, and says so in a `# deferred: ...` comment on its line or on the
    block of imports it belongs to; one written to dodge a cycle would hide what test_no_import_cycles
    looks for."""
    unexplained = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            block: list[ast.stmt] = []  # the run of import statements the current one belongs to
            imports = [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom | ast.Import)]
            for statement in sorted(imports, key=lambda n: n.lineno):
                if not block or statement.lineno != block[-1].end_lineno + 1:
                    block = []
                block.append(statement)
                if (statement.module if isinstance(statement, ast.ImportFrom) else "").startswith("loratool"):
                    # the block, the comment line above it, or a "# deferred, here and below" earlier on
                    text = " ".join(lines[max(block[0].lineno - 2, 0) : statement.end_lineno])
                    earlier = lines[: statement.lineno]
                    if "# deferred" not in text and not any(
                        "# deferred, here and below" in x for x in earlier
                    ):
                        unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{statement.lineno}")
    assert unexplained == []
