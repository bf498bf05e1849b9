"""The library's import contract: which vlmopt packages may load which, and no import cycles.

The import graph is read from the source with :mod:`ast`, the way :mod:`vlmopt.code_digest` reads
it: every ``import`` and ``from ... import`` anywhere in a module counts, including those inside
functions (the library imports heavy modules lazily, and a lazy import still runs when its function
does); imports under ``if TYPE_CHECKING:`` do not (they are for annotations only); relative imports
are resolved; ``from vlmopt.x import y`` where ``y`` is a submodule imports ``vlmopt.x.y``.

The package rules are transitive: a rule "P does not import Q" holds when no module of P can reach
any module of Q by any chain of imports, so, for example, a scoring job that imports
:mod:`vlmopt.metrics` never loads model code, whatever module in between would pull it in.
Reachability follows Python's import system: importing ``vlmopt.a.b`` runs ``vlmopt/a/__init__.py``
first, so a module also reaches its parent packages and everything their ``__init__`` imports.

Cycles are strongly connected components (of more than one module) of the graph of the imports
written in the code, without those implicit parent-package imports: a package ``__init__`` that
re-exports its submodules does not form a cycle with them, and neither does a submodule that
imports a sibling as ``from vlmopt.x import y``; a submodule that reads a name from its own
package's ``__init__`` (``from vlmopt.x import NAME``) does, since that ``__init__`` imports it.
"""

from __future__ import annotations

import ast
import shutil
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

import vlmopt
from vlmopt.code_digest import _imported, _walk_runtime

SRC = Path(vlmopt.__file__).resolve().parent

#: (package, packages that no module of it may reach).
RULES: list[tuple[str, tuple[str, ...]]] = [
    ("vlmopt.metrics", ("vlmopt.models", "vlmopt.compress")),
    ("vlmopt.data", ("vlmopt.models", "vlmopt.compress", "vlmopt.finetune", "vlmopt.infer")),
    ("vlmopt.models", ("vlmopt.compress",)),
    ("vlmopt.compress", ("vlmopt.tasks", "vlmopt.infer", "vlmopt.pipeline")),
]

#: Top-level packages that no vlmopt module may import, directly (they are not vlmopt code).
FORBIDDEN_EXTERNAL = ("snakemake",)


@dataclass(frozen=True)
class Edge:
    """One import of ``target`` by ``source``: the first statement (by line) that makes it."""

    source: str
    target: str
    line: int
    statement: str

    def __str__(self) -> str:
        if not self.line:
            return f"{self.source} -> {self.target} ({self.statement})"
        return f"{self.source} -> {self.target} (line {self.line}: {self.statement})"


@dataclass(repr=False)
class ImportGraph:
    """The imports of every module of one copy of the vlmopt package.

    ``written`` holds the imports as the code writes them (the cycle graph); ``loads`` adds to
    them what Python runs besides: a package imported as ``from vlmopt.x import y`` and every
    module's parent package (the reachability graph); ``external`` holds imports of other packages.
    """

    modules: set[str]
    written: dict[str, dict[str, Edge]]
    loads: dict[str, dict[str, Edge]]
    external: dict[str, dict[str, Edge]]

    def __repr__(self) -> str:
        return f"ImportGraph({len(self.modules)} modules)"


def _contains(package: str, module: str) -> bool:
    return module == package or module.startswith(package + ".")


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(("vlmopt", *parts))


def _add(edges: dict[str, dict[str, Edge]], edge: Edge) -> None:
    known = edges[edge.source].get(edge.target)
    if known is None or (edge.line and (not known.line or edge.line < known.line)):
        edges[edge.source][edge.target] = edge


def import_graph(root: Path = SRC) -> ImportGraph:
    """The import graph of the vlmopt package whose folder is ``root``."""
    root = Path(root).resolve()
    paths = {_module_name(p, root): p for p in sorted(root.rglob("*.py")) if "__pycache__" not in p.parts}
    written: dict[str, dict[str, Edge]] = defaultdict(dict)
    loads: dict[str, dict[str, Edge]] = defaultdict(dict)
    external: dict[str, dict[str, Edge]] = defaultdict(dict)
    for module, path in paths.items():
        text = path.read_text()
        for node in _walk_runtime(ast.parse(text, str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            statement = ast.unparse(node)
            targets = _imported(node, module, root)
            for target in targets:
                _add(loads, Edge(module, target, node.lineno, statement))
            if isinstance(node, ast.ImportFrom):
                # The package of ``from P import a, b`` is written as an import only when some
                # imported name is not a submodule of it (a name read from P's __init__).
                package = next((t for t in targets if all(f"{t}.{a.name}" in targets for a in node.names)), None)
                if package is not None:
                    targets = targets - {package}
            for target in targets:
                _add(written, Edge(module, target, node.lineno, statement))
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                names = [node.module] if node.level == 0 and node.module else []
            for name in names:
                if not _contains("vlmopt", name):
                    _add(external, Edge(module, name, node.lineno, statement))
        if module != "vlmopt":
            parent = module.rpartition(".")[0]
            _add(loads, Edge(module, parent, 0, "its package, whose __init__ runs first"))
    return ImportGraph(set(paths), dict(written), dict(loads), dict(external))


def _chain(parents: dict[str, Edge | None], module: str) -> list[Edge]:
    chain: list[Edge] = []
    while (edge := parents[module]) is not None:
        chain.append(edge)
        module = edge.source
    return chain[::-1]


def package_violations(graph: ImportGraph, package: str, forbidden: tuple[str, ...]) -> list[str]:
    """Each import into a ``forbidden`` package that a module of ``package`` reaches, with its chain.

    One line per offending import (the edge that enters a forbidden package), with the shortest
    chain to it from any module of ``package``.
    """
    start = sorted(m for m in graph.modules if _contains(package, m))
    parents: dict[str, Edge | None] = {m: None for m in start}
    todo = deque(start)
    found: dict[tuple[str, str], Edge] = {}
    while todo:
        module = todo.popleft()
        for target, edge in sorted(graph.loads.get(module, {}).items()):
            if any(_contains(f, target) for f in forbidden):
                found.setdefault((edge.source, target), edge)
                continue
            if target not in parents:
                parents[target] = edge
                todo.append(target)
    lines = []
    for (source, target), edge in sorted(found.items()):
        chain = [*_chain(parents, source), edge]
        if len(chain) == 1:
            lines.append(f"{source} imports {target} (line {edge.line}: {edge.statement})")
        else:
            lines.append(
                f"{chain[0].source} reaches {target}, which {source} imports (line {edge.line}: "
                f"{edge.statement}); chain: " + "; ".join(str(e) for e in chain)
            )
    return lines


def external_violations(graph: ImportGraph, name: str) -> list[str]:
    """Every vlmopt module that imports the external package ``name`` (or a module of it)."""
    return [
        f"{module} imports {target} (line {edge.line}: {edge.statement})"
        for module, edges in sorted(graph.external.items())
        for target, edge in sorted(edges.items())
        if _contains(name, target)
    ]


def _reachable(edges: dict[str, dict[str, Edge]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for target in edges.get(todo.pop(), {}):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def import_cycles(graph: ImportGraph) -> list[str]:
    """One line per strongly connected component of more than one module, with the imports inside it."""
    reach = {m: _reachable(graph.written, m) for m in graph.modules}
    components = {frozenset(n for n in reach[m] if m in reach[n]) for m in graph.modules}
    lines = []
    for component in sorted((c for c in components if len(c) > 1), key=sorted):
        inside = [
            str(edge)
            for source in sorted(component)
            for target, edge in sorted(graph.written.get(source, {}).items())
            if target in component
        ]
        lines.append(f"cycle among {', '.join(sorted(component))}: " + "; ".join(inside))
    return lines


def _report(problems: list[str]) -> str:
    return "\n".join(["", *problems])


@pytest.fixture(scope="module")
def graph() -> ImportGraph:
    return import_graph()


def test_the_graph_reads_the_library(graph):
    assert {"vlmopt", "vlmopt.metrics.vqa", "vlmopt.compress", "vlmopt.pipeline"} <= graph.modules
    assert "vlmopt.metrics.vqa" in graph.written["vlmopt.metrics.caption"]
    assert "vlmopt.metrics.vqa" in graph.written["vlmopt.metrics"]
    # Loading a module runs its package's __init__: an edge for reachability, not for cycles.
    assert "vlmopt.metrics" in graph.loads["vlmopt.metrics.vqa"]
    assert "vlmopt.metrics" not in graph.written.get("vlmopt.metrics.vqa", {})
    caption = graph.external["vlmopt.metrics.caption"]  # imports of other packages, kept apart
    assert "pycocoevalcap.cider.cider" in caption and "vlmopt.metrics.vqa" not in caption


@pytest.mark.parametrize("name", FORBIDDEN_EXTERNAL)
def test_the_library_never_imports(graph, name):
    problems = external_violations(graph, name)
    assert not problems, _report(problems)


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_package_does_not_reach(graph, package, forbidden):
    problems = package_violations(graph, package, forbidden)
    assert not problems, _report(problems)


def test_no_import_cycles(graph):
    problems = import_cycles(graph)
    assert not problems, _report(problems)


# The checker itself: each violation, planted into a copy of the package, is reported.


@pytest.fixture
def copy(tmp_path) -> Path:
    root = tmp_path / "vlmopt"
    shutil.copytree(SRC, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _append(path: Path, code: str) -> None:
    with path.open("a") as f:
        f.write("\n" + code)


def _new(before: list[str], after: list[str]) -> list[str]:
    return [line for line in after if line not in before]


def test_the_checker_finds_a_snakemake_import_inside_a_function(graph, copy):
    before = external_violations(graph, "snakemake")
    _append(
        copy / "metrics" / "wer.py",
        "def _rule_name():\n    from snakemake.io import Wildcards\n\n    return Wildcards\n",
    )
    line = _last_import_line(copy / "metrics" / "wer.py")
    assert _new(before, external_violations(import_graph(copy), "snakemake")) == [
        f"vlmopt.metrics.wer imports snakemake.io (line {line}: from snakemake.io import Wildcards)"
    ]


def test_the_checker_finds_a_direct_forbidden_import(graph, copy):
    rule = ("vlmopt.metrics", ("vlmopt.models", "vlmopt.compress"))
    before = package_violations(graph, *rule)
    _append(copy / "metrics" / "vqa.py", "from vlmopt.models import base\n")
    line = _last_import_line(copy / "metrics" / "vqa.py")
    assert _new(before, package_violations(import_graph(copy), *rule)) == [
        f"vlmopt.metrics.vqa imports {target} (line {line}: from vlmopt.models import base)"
        for target in ("vlmopt.models", "vlmopt.models.base")
    ]


def test_the_checker_finds_a_transitive_forbidden_import_and_names_its_chain(graph, copy):
    rule = ("vlmopt.metrics", ("vlmopt.models", "vlmopt.compress"))
    before = package_violations(graph, *rule)
    # metrics.retrieval -> data.local_folders (-> parent vlmopt.data); data.archives -> compress.quant.
    _append(copy / "metrics" / "retrieval.py", "def _folders():\n    from vlmopt.data import local_folders\n")
    _append(copy / "data" / "archives.py", "def _quantize():\n    from vlmopt.compress.quant import quantize\n")
    retrieval = _last_import_line(copy / "metrics" / "retrieval.py")
    archives = _last_import_line(copy / "data" / "archives.py")
    init = _first_import_line(copy / "data" / "__init__.py", "vlmopt.data.archives")
    assert _new(before, package_violations(import_graph(copy), *rule)) == [
        "vlmopt.metrics.retrieval reaches vlmopt.compress.quant, which vlmopt.data.archives imports "
        f"(line {archives}: from vlmopt.compress.quant import quantize); chain: "
        f"vlmopt.metrics.retrieval -> vlmopt.data (line {retrieval}: from vlmopt.data import local_folders); "
        f"vlmopt.data -> vlmopt.data.archives (line {init}: from vlmopt.data.archives import safe_extract); "
        f"vlmopt.data.archives -> vlmopt.compress.quant (line {archives}: from vlmopt.compress.quant import quantize)"
    ]


def test_the_checker_skips_imports_for_annotations_only(graph, copy):
    rule = ("vlmopt.metrics", ("vlmopt.models",))
    before = package_violations(graph, *rule)
    _append(
        copy / "metrics" / "vqa.py",
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from vlmopt.models.base import LoadedModel\n",
    )
    assert package_violations(import_graph(copy), *rule) == before


def test_the_checker_finds_a_cycle_closed_by_a_relative_import(graph, copy):
    before = import_cycles(graph)
    _append(copy / "metrics" / "vqa.py", "def _wer():\n    from .wer import word_error_rate\n")
    _append(copy / "metrics" / "wer.py", "from vlmopt.metrics import vqa\n")
    new = _new(before, import_cycles(import_graph(copy)))
    assert new == [
        "cycle among vlmopt.metrics.vqa, vlmopt.metrics.wer: "
        f"vlmopt.metrics.vqa -> vlmopt.metrics.wer (line {_last_import_line(copy / 'metrics' / 'vqa.py')}: "
        "from .wer import word_error_rate); "
        f"vlmopt.metrics.wer -> vlmopt.metrics.vqa (line {_last_import_line(copy / 'metrics' / 'wer.py')}: "
        "from vlmopt.metrics import vqa)"
    ]


def _last_import_line(path: Path) -> int:
    tree = ast.parse(path.read_text())
    return max(n.lineno for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom))


def _first_import_line(path: Path, module: str) -> int:
    tree = ast.parse(path.read_text())
    return min(n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == module)


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, code in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code)
    return root


def test_a_package_reexporting_its_submodules_is_no_cycle(tmp_path):
    root = _package(
        tmp_path / "vlmopt",
        {
            "__init__.py": "",
            "pkg/__init__.py": "from vlmopt.pkg.a import f\nfrom .b import g\n",
            "pkg/a.py": "from vlmopt.pkg import b\n\ndef f():\n    return b.g()\n",
            "pkg/b.py": "def g():\n    return 1\n",
        },
    )
    assert import_cycles(import_graph(root)) == []
    # A submodule reading a name from its own package's __init__, which imports it, is a cycle.
    _append(root / "pkg" / "b.py", "def h():\n    from vlmopt.pkg import f\n\n    return f\n")
    assert import_cycles(import_graph(root)) == [
        "cycle among vlmopt.pkg, vlmopt.pkg.a, vlmopt.pkg.b: "
        "vlmopt.pkg -> vlmopt.pkg.a (line 1: from vlmopt.pkg.a import f); "
        "vlmopt.pkg -> vlmopt.pkg.b (line 2: from .b import g); "
        "vlmopt.pkg.a -> vlmopt.pkg.b (line 1: from vlmopt.pkg import b); "
        "vlmopt.pkg.b -> vlmopt.pkg (line 5: from vlmopt.pkg import f)"
    ]


def test_reaching_a_module_runs_its_package_init(tmp_path):
    root = _package(
        tmp_path / "vlmopt",
        {
            "__init__.py": "",
            "light/__init__.py": "",
            "light/score.py": "from vlmopt.shared.small import helper\n",
            "shared/__init__.py": "from vlmopt.shared.heavy import model\n",
            "shared/small.py": "def helper():\n    return 1\n",
            "shared/heavy.py": "import vlmopt.models.base\n\nmodel = None\n",
            "models/__init__.py": "",
            "models/base.py": "",
        },
    )
    assert package_violations(import_graph(root), "vlmopt.light", ("vlmopt.models",)) == [
        "vlmopt.light.score reaches vlmopt.models.base, which vlmopt.shared.heavy imports "
        "(line 1: import vlmopt.models.base); "
        "chain: vlmopt.light.score -> vlmopt.shared.small (line 1: from vlmopt.shared.small import helper); "
        "vlmopt.shared.small -> vlmopt.shared (its package, whose __init__ runs first); "
        "vlmopt.shared -> vlmopt.shared.heavy (line 1: from vlmopt.shared.heavy import model); "
        "vlmopt.shared.heavy -> vlmopt.models.base (line 1: import vlmopt.models.base)"
    ]
