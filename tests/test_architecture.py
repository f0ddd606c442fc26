"""The package layout is the architecture: layers import downwards only, no import cycles (deferred
imports included), the repository refers to nothing outside itself and carries no issue numbers.

The checks read the source with ``ast`` (every import statement, at module level or inside a
function), so a deferred import that would close a cycle is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fl_sim"

# Layer of each top-level part of fl_sim, lowest first. A module may import its own layer's
# packages only where ALLOWED says so, and any package of a lower layer listed there.
ALLOWED: dict[str, set[str]] = {
    "rng": set(),
    "compression": {"rng"},
    "channels": {"rng"},
    "data": {"rng"},
    "models": set(),
    "config": {"rng", "compression", "data", "models"},
    "wire": {"rng", "compression"},
    "strategies": {"rng", "compression", "channels", "config", "wire"},
    "clients": {"rng", "compression", "channels", "data", "models", "config", "wire"},
    "engine": {"rng", "compression", "channels", "data", "models", "config", "wire", "strategies", "clients"},
    "runs": {"rng", "compression", "channels", "data", "models", "config", "wire", "strategies", "clients",
             "engine"},
    "experiments": {"rng", "compression", "channels", "data", "models", "config", "wire", "strategies",
                    "clients", "engine", "runs"},
    "bench": {"rng", "compression", "channels", "data", "models", "config", "wire", "strategies", "clients",
              "engine", "runs", "experiments"},
    "testing": {"engine", "runs"},
    "app": {"rng", "compression", "channels", "data", "models", "config", "wire", "strategies", "clients",
            "engine", "runs"},
    "cli": {"rng", "compression", "channels", "data", "models", "config", "wire", "strategies", "clients",
            "engine", "runs", "experiments", "bench"},
}
FLOWER_FREE = {"rng", "compression", "channels", "data", "models", "config"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    return mods


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(fl_sim modules, other top-level packages) that module ``name`` imports anywhere in its body."""
    path = MODULES[name]
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                head = base[: len(base) - (node.level - 1)]
                target = ".".join(head + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fl_sim"):
                others.add(target.split(".")[0])
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & MODULES.keys()
            # `from pkg import submodule` imports the submodule; `from pkg import name` the package
            ours |= subs or ({target} & MODULES.keys())
            if not subs and target not in MODULES:
                ours.add(target)  # an import of a module that does not exist: reported by the test below
        elif isinstance(node, ast.Import):
            for a in node.names:
                (ours if a.name.startswith("fl_sim") else others).add(
                    a.name if a.name.startswith("fl_sim") else a.name.split(".")[0])
    return ours, others


GRAPH = {name: _imports(name) for name in MODULES}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "fl_sim"


def test_every_internal_import_names_an_existing_module():
    missing = {(m, t) for m, (ours, _) in GRAPH.items() for t in ours if t not in MODULES}
    assert not missing, f"imports of modules that do not exist: {sorted(missing)}"


def test_the_package_top_shows_the_layers():
    """Every part of fl_sim is a known layer, and each package's __init__ says its job and its imports."""
    parts = {_part(m) for m in MODULES} - {"fl_sim"}
    assert parts == set(ALLOWED), f"parts without a layer (add to ALLOWED and docs/ARCHITECTURE.md): {parts ^ set(ALLOWED)}"
    for pkg in sorted(p for p in parts if (PKG / p).is_dir()):
        doc = ast.get_docstring(ast.parse((PKG / pkg / "__init__.py").read_text(encoding="utf-8"))) or ""
        assert len(doc) > 80 and "import" in doc, f"fl_sim/{pkg}/__init__.py must say its job and what it may import"


def test_layers_import_downwards_only():
    bad = []
    for m, (ours, _) in GRAPH.items():
        src = _part(m)
        if src == "fl_sim":
            continue
        for t in ours:
            dst = _part(t)
            if dst not in (src, "fl_sim") and dst not in ALLOWED[src]:
                bad.append(f"{m} -> {t}")
    assert not bad, "imports against the layering (docs/ARCHITECTURE.md):\n" + "\n".join(sorted(bad))


def test_kernels_and_config_never_import_flower():
    bad = [m for m, (_, others) in GRAPH.items() if _part(m) in FLOWER_FREE and "flwr" in others]
    assert not bad, f"Flower imported by a layer that must stay usable without it: {bad}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_no_import_cycles_deferred_imports_included():
    graph = {m: {t for t in ours if t != m} for m, (ours, _) in GRAPH.items()}
    # A package's __init__ importing its own submodules is how a package exports; a submodule importing its
    # package's __init__ back is the cycle this test exists for.
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a deferred import that closes a loop is found."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _repo_text_files() -> list[Path]:
    roots = [ROOT / "fl_sim", ROOT / "tests", ROOT / "docs", ROOT / "examples"]
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "pyproject.toml"]
    for r in roots:
        files += [p for p in r.rglob("*") if p.suffix in {".py", ".md", ".yaml", ".toml", ".txt", ".csv"}]
    return [p for p in files if p.is_file()]


OUTSIDE = re.compile(r"\.\./shared|shared/papers|shared/NOTES|papers/NOTES|NOTES\.md|NOTES section|/work/")
ISSUE = re.compile(r"\b[Ii]ssues? #?\d+|(?<![\w/.-])#\d{1,3}\b(?![\w.-])")


@pytest.mark.parametrize("pattern,what", [(OUTSIDE, "a path outside the repository"), (ISSUE, "an issue number")])
def test_repository_stands_alone(pattern, what):
    """No reference to files a person who clones the repository does not have, and no issue numbers
    (history lives in git log and CHANGELOG.md). The CHANGELOG itself may name nothing outside either."""
    this = Path(__file__).resolve()
    hits = []
    for p in _repo_text_files():
        if p.resolve() == this:
            continue
        for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not hits, f"{len(hits)} lines with {what}:\n" + "\n".join(hits[:40])


def test_the_patterns_match_what_they_exist_for():
    assert OUTSIDE.search("see shared/papers/README.md") and OUTSIDE.search("NOTES section 6")
    assert ISSUE.search("fl-sim before issue 12") and ISSUE.search("(#17)")
    assert not ISSUE.search("a 3#4 shape") and not ISSUE.search("color #ffffff")
