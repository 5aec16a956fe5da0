"""The package's layout rule: each stage imports only the shared top-level modules and earlier stages; no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import lmtune

ROOT = Path(lmtune.__file__).parent
STAGES = ["data", "training", "export", "inference", "evaluation"]  # the pipeline's order
ENTRY_POINTS = {"lmtune", "lmtune.cli", "lmtune.quickstart", "lmtune.__main__"}  # may use every stage
UI = "lmtune.ui"  # the web UI sits above every stage, like the CLI: its modules may use them all


def _is_entry_point(module: str) -> bool:
    return module in ENTRY_POINTS or module == UI or module.startswith(UI + ".")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Module -> the lmtune modules it imports (at any depth of the file, lazy imports included)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("lmtune")}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                if not target.startswith("lmtune"):
                    continue
                for alias in node.names:  # `from . import processes` imports a module (or a package), not a name
                    submodule = f"{target}.{alias.name}"
                    where = ROOT.parent / submodule.replace(".", "/")
                    is_module = where.with_suffix(".py").exists() or (where / "__init__.py").exists()
                    deps.add(submodule if is_module else target)
        graph[name] = deps - {name}
    return graph


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def test_every_stage_folder_exists_and_says_what_it_is_for():
    for stage in STAGES:
        init = ROOT / stage / "__init__.py"
        assert init.is_file() and ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))


def test_no_module_imports_one_that_imports_it_back():
    graph = _imports()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for dep in graph.get(todo.pop(), ()):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    in_cycles = sorted(m for m in graph if m in reachable(m) and m != "lmtune")
    assert in_cycles == []


def test_imports_go_one_way_down_the_pipeline():
    wrong = []
    for module, deps in _imports().items():
        if _is_entry_point(module):
            continue
        for dep in deps:
            own, theirs = _stage(module), _stage(dep)
            if theirs is None:
                continue
            if own is None:
                wrong.append(f"shared module {module} imports the {theirs} stage ({dep})")
            elif STAGES.index(theirs) > STAGES.index(own):
                wrong.append(f"{module} ({own}) imports a later stage: {dep}")
    assert wrong == []


def test_only_the_cli_starts_the_web_ui():
    """The UI is an optional layer on top: no stage or shared module may depend on it (only `lmtune ui` starts it)."""
    wrong = [f"{module} imports {dep}" for module, deps in _imports().items() for dep in deps
             if (dep == UI or dep.startswith(UI + ".")) and not _is_entry_point(module)]
    assert wrong == []
