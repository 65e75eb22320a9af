"""The package's layering, checked on its source: no import cycle between recnec_cli modules and
no module importing another's private (``_``) names, counting imports inside functions too (a
lazy import is still a dependency); the executors implement the execution seam's Protocol."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "recnec_cli"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """``(edges, private)``: module -> recnec_cli modules it imports; ``private`` lists
    ``"importer: module._name (line N)"`` for every import of another module's ``_name``."""
    modules = {_module_name(p): p for p in PKG_DIR.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "recnec_cli":
                    continue
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in modules:  # `from . import module`
                        targets.add(full)
                        continue
                    targets.add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name}: {target}.{alias.name} (line {node.lineno})")
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "recnec_cli")
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    edges, _ = _imports()
    assert len(edges) > 50  # the walk saw the package
    assert _cycles(edges) == []


def test_no_module_imports_another_modules_private_names() -> None:
    _, private = _imports()
    assert private == []


def test_the_stages_and_the_nouns_do_not_import_orchestration_or_the_cli() -> None:
    """Layering: stages/, qc/ and the nouns (results, study, errors, config) never import the
    orchestration layer or the CLI; the library never imports Typer or Rich."""
    edges, _ = _imports()
    lower = [m for m in edges if m.startswith(("recnec_cli.stages", "recnec_cli.qc"))
             or m in ("recnec_cli.results", "recnec_cli.study", "recnec_cli.errors", "recnec_cli.config")]
    bad = {m: sorted(t for t in edges[m] if t.startswith(("recnec_cli.orchestration", "recnec_cli.cli")))
           for m in lower}
    assert {m: t for m, t in bad.items() if t} == {}


@pytest.mark.parametrize("name", ["InProcessExecutor", "WorkerPool", "DaskExecutor"])
def test_every_executor_implements_the_seam(name: str) -> None:
    from recnec_cli.orchestration.seam import StudyExecutor

    if name == "InProcessExecutor":
        from recnec_cli.orchestration.executors import InProcessExecutor as cls
    elif name == "WorkerPool":
        from recnec_cli.orchestration.workers import WorkerPool as cls
    else:
        pytest.importorskip("distributed")
        from recnec_cli.orchestration.cluster import DaskExecutor as cls
    methods = ("submit", "slots", "self_test", "description", "shutdown")
    missing = [m for m in methods if not callable(getattr(cls, m, None))]
    assert missing == []
    assert hasattr(cls, "remote_inference") or "remote_inference" in cls.__init__.__code__.co_names
    if name == "InProcessExecutor":
        assert isinstance(cls(), StudyExecutor)
