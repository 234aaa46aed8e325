"""The package's shape (docs/architecture.md §1): imports flow one way between layers, no two
modules import each other (directly or through a cycle), modules stay small, and every file
reference in README.md and docs/ resolves inside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "deltakern"

# Layer of each top-level part of the package, lowest first (docs/architecture.md §1). A module
# may import its own part and parts of a strictly lower layer, never a higher or an equal one.
LAYERS = {
    "_version": 0,
    "core": 0,
    "reference": 1,
    "ops": 2,
    "scoring": 3,
    "loss": 3,
    "metrics": 3,
    "data": 4,
    "runtime": 4,
    "ood": 5,
    "clip": 5,
    "prompt": 6,
    "pipeline": 7,
    "bench": 8,
    "integrations": 8,
    "cli": 9,
}
# The benchmark harness measures the public functions against the references; beyond those it
# may use only the layers below them and data (plus the synthetic data and the prompt-tuning
# step counter it measures).
BENCH_MAY_IMPORT = {"_version", "core", "reference", "ops", "scoring", "loss", "metrics", "data", "runtime",
                    "ood.synthetic", "prompt.benchmark", "clip.models", "bench"}
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, name: str, is_package: bool) -> set[str]:
    """Every deltakern module ``path`` imports, at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "deltakern"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "deltakern":
                continue
            # "from deltakern.x import y" imports the module x.y when there is one, else a name of x.
            found |= {f"{module}.{alias.name}" if f"{module}.{alias.name}" in MODULES else module for alias in node.names}
    return found


MODULES = _modules()


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = MODULES
    edges = {}
    for name, path in modules.items():
        imported = _imports(path, name, path.name == "__init__.py")
        edges[name] = {m for m in imported if m in modules and m != name}
    return edges


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "deltakern"


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        src_part = _part(src)
        if src_part == "deltakern":  # the package root re-exports the public API
            continue
        for dst in targets:
            dst_part = _part(dst)
            if dst_part == "deltakern":
                bad.append(f"{src} imports the package root {dst}: import the defining module instead")
                continue
            if dst_part == src_part:
                continue
            if LAYERS[dst_part] >= LAYERS[src_part]:
                bad.append(f"{src} (layer {LAYERS[src_part]}) imports {dst} (layer {LAYERS[dst_part]})")
            if src_part == "bench":
                sub = ".".join(dst.split(".")[1:3])
                if dst_part not in BENCH_MAY_IMPORT and sub not in BENCH_MAY_IMPORT:
                    bad.append(f"{src}: the bench harness may not import {dst}")
    return bad


def test_every_part_has_a_layer():
    parts = {_part(m) for m in _modules()} - {"deltakern"}
    assert parts <= set(LAYERS), f"parts without a layer in docs/architecture.md §1: {sorted(parts - set(LAYERS))}"


def test_imports_flow_down_the_layers(graph):
    assert _layer_violations(graph) == []


def test_the_layer_check_catches_an_upward_import(graph):
    planted = {**graph, "deltakern.core.validation": graph["deltakern.core.validation"] | {"deltakern.scoring"}}
    assert any("deltakern.core.validation" in v for v in _layer_violations(planted))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles(graph):
    # A package's __init__ re-exporting its submodules is not a cycle of the design; a submodule
    # importing its own package's __init__ would be, so edges into an __init__ are kept.
    edges = {src: {d for d in dsts if not (src == d.rsplit(".", 1)[0] and d.startswith(src + "."))} for src, dsts in graph.items()}
    assert _cycles(edges) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]


def test_modules_stay_small():
    long = {
        str(path.relative_to(REPO)): n
        for path in PACKAGE.rglob("*.py")
        if "ops/triton" not in path.as_posix() and (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


# ---- documents -------------------------------------------------------------------------------

_LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
# Paths into the repository written as code (`bench/gpu_check.sh`); bare file names such as
# `scores.parquet` are examples of a user's files, not references.
_CODE_PATH = re.compile(r"`((?:\.\./|\./)?(?:docs|bench|tests|csrc|deltakern|\.ci)/[\w./-]*)`")
# Documents are cited by upper-case names (README.md, RESULTS.md) or under docs/.
_DOC_CITATION = re.compile(r"\b((?:docs/)?[A-Z][A-Z_]*\.md|docs/[\w-]+\.md)\b")


def _documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_documents_exist():
    for name in ("conventions.md", "architecture.md"):
        assert (REPO / "docs" / name).is_file(), f"docs/{name} is missing"


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: p.name)
def test_document_references_resolve(doc: Path):
    text = doc.read_text()
    missing = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    for target in _CODE_PATH.findall(text):
        target = target.rstrip("/.")
        if "*" in target or "{" in target:
            continue
        if not ((doc.parent / target).exists() or (REPO / target).exists()):
            missing.append(target)
    assert missing == [], f"{doc.name} refers to files that are not in the repository: {sorted(set(missing))}"


def test_no_file_cites_a_document_outside_the_repository():
    """Every ``*.md`` named in code, comments, docstrings, scripts and documents exists here."""
    docs = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts and "cmake-build" not in p.parts}
    suffixes = {".py", ".cpp", ".h", ".cu", ".sh", ".md", ".toml", ".txt"}
    offenders = []
    for path in REPO.rglob("*"):
        if path.suffix not in suffixes or not path.is_file():
            continue
        if any(part in (".venv", ".git", "cmake-build", "build") or part.endswith(".egg-info") for part in path.parts):
            continue
        for cited in _DOC_CITATION.findall(path.read_text(errors="replace")):
            name = Path(cited).name
            if name not in docs:
                offenders.append(f"{path.relative_to(REPO)}: {cited}")
    assert offenders == []
