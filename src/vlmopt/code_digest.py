"""Which library code each pipeline stage runs, as a digest: editing that code reruns the stage.

Snakemake reruns a job when its rule's script, inputs or params change, but a script here is a
thin call into :mod:`vlmopt.pipeline`, so an edit to, say, :mod:`vlmopt.metrics.vqa` would go
unnoticed. Every rule therefore carries a ``code`` param, :func:`stage_digest` of its stage: a
hash of the source of the stage's entry function in the :mod:`vlmopt.pipeline` package (and the
pipeline helpers it calls), of every vlmopt module that source imports, and, transitively, of every vlmopt
module those import (anywhere in the file, including imports inside functions, since the library
imports heavy modules lazily), with their packages' ``__init__.py``. Editing a module that a stage
can reach changes the digest of that stage only: an edit to the caption metrics reruns scoring and
the tables after it, not inference. Comments count as edits (the digest is of the bytes); the
digest reads source files, so it works the same for an editable and an installed vlmopt.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

__all__ = ["SCORING_STAGES", "STAGES", "stage_digest", "stage_modules"]

#: Stage (Snakemake rule) -> its entry functions in the vlmopt.pipeline package.
STAGES: dict[str, tuple[str, ...]] = {
    "prepare_dataset": ("prepare_dataset",),
    "label_dataset": ("label_dataset",),
    "build_model": ("build_model",),
    "finetune": ("finetune_model",),
    "compress": ("compress_model",),
    "export": ("export_model",),
    "infer": ("predict_shard",),
    "gather_predictions": ("gather_predictions",),
    "score": ("score_predictions",),
    "profile": ("profile_variant",),
    "sweep": ("profile_variant",),
    "tables": ("build_tables",),
    "html_report": ("build_html_report",),
    "figure": ("build_figure",),
}

_PACKAGE = "vlmopt"


#: The folder of the vlmopt package (found without importing any of its modules).
_ROOT = Path(__file__).resolve().parent


@cache
def _source_path(module: str, root: Path = _ROOT) -> Path | None:
    """The file of ``vlmopt[.x[.y]]`` (module or package) under ``root``, None for a name that is not a module."""
    parts = module.split(".")
    if parts[0] != _PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for path in (base / "__init__.py", base.with_suffix(".py") if len(parts) > 1 else None):
        if path is not None and path.is_file():
            return path
    return None


def _is_package(module: str, root: Path) -> bool:
    path = _source_path(module, root)
    return path is not None and path.name == "__init__.py"


def _walk_runtime(node: ast.AST):
    """``ast.walk`` without the bodies of ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        if isinstance(current, ast.If) and "TYPE_CHECKING" in ast.unparse(current.test):
            todo += current.orelse
            continue
        todo += list(ast.iter_child_nodes(current))


def _imported(node: ast.AST, module: str, root: Path) -> set[str]:
    """vlmopt modules named by the import statements under ``node`` (in ``module``)."""
    found: set[str] = set()
    for sub in _walk_runtime(node):
        if isinstance(sub, ast.Import):
            found |= {a.name for a in sub.names}
        elif isinstance(sub, ast.ImportFrom):
            if sub.level:  # relative: resolve against the importing module's package
                base = module if _is_package(module, root) else module.rpartition(".")[0]
                for _ in range(sub.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{sub.module}" if sub.module else base
            else:
                target = sub.module or ""
            found.add(target)
            # ``from vlmopt.data import labeling`` imports a submodule.
            found |= {f"{target}.{a.name}" for a in sub.names}
    return {m for m in found if (m == _PACKAGE or m.startswith(_PACKAGE + ".")) and _source_path(m, root)}


def _module_imports(module: str, root: Path) -> set[str]:
    path = _source_path(module, root)
    if path is None:
        return set()
    stat = path.stat()
    return set(_parsed_imports(module, root, path, stat.st_mtime_ns, stat.st_size))


@cache
def _parsed_imports(module: str, root: Path, path: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """Imports of one file, parsed once per version of it (its modification time and size)."""
    return frozenset(_imported(ast.parse(path.read_text(), str(path)), module, root))


def _with_parents(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _pipeline_modules(root: Path) -> list[str]:
    """The modules of the vlmopt.pipeline package (its stage functions), without its ``__init__``."""
    folder = root / "pipeline"
    return sorted(f"{_PACKAGE}.pipeline.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


def _entry_sources(stage: str, root: Path) -> tuple[list[str], set[str]]:
    """Source of the stage's pipeline functions (and the pipeline helpers they call) and their imports.

    The functions are looked up by name across the modules of vlmopt.pipeline; the module-level
    imports of each module a function comes from count, those of the other modules do not.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGES)}")
    functions: dict[str, tuple[str, ast.FunctionDef, str]] = {}
    module_level: dict[str, set[str]] = {}
    for module in _pipeline_modules(root):
        path = _source_path(module, root)
        text = path.read_text()
        tree = ast.parse(text, str(path))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                if node.name in functions:
                    raise ValueError(f"{node.name} is defined in both {functions[node.name][0]} and {module}")
                functions[node.name] = (module, node, text)
        module_level[module] = set()
        for node in tree.body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                module_level[module] |= _imported(node, module, root)
    imports: set[str] = set()
    sources, todo, seen = [], list(STAGES[stage]), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        module, node, text = functions[name]
        sources.append(ast.get_source_segment(text, node) or "")
        imports |= module_level[module] | _imported(node, module, root)
        todo += [n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in functions]
    return sorted(sources), imports


#: Stages that score predictions. The task definitions (vlmopt.tasks) import their scorers from
#: vlmopt.metrics; the other stages reach the task definitions for prompts and targets but never
#: score, so for them those imports are not followed: an edit to a metric reruns scoring and what
#: follows it, not inference. Any other path from a stage to vlmopt.metrics still counts.
SCORING_STAGES = frozenset({"score", "figure", "html_report"})


def stage_modules(stage: str, root: str | Path | None = None) -> list[str]:
    """Every vlmopt module (with its parent packages) that ``stage`` can import, sorted.

    A parent package that a module is reached through (``vlmopt.study`` for ``vlmopt.study.sweep``)
    counts with its own source, but its imports are followed only where the stage imports the
    package itself: a stage that needs the sweep axes does not depend on every module the
    package re-exports. ``root`` is the vlmopt package folder to read (default: the one this
    module belongs to).
    """
    root = Path(root).resolve() if root is not None else _ROOT
    _, imports = _entry_sources(stage, root)
    scores = stage in SCORING_STAGES
    todo, seen, followed = list(imports), set(), set()
    while todo:
        module = todo.pop()
        if module in followed:
            continue
        seen.add(module)
        followed.add(module)
        if module == f"{_PACKAGE}.pipeline" or module.startswith(f"{_PACKAGE}.pipeline."):
            # Pipeline code counts per stage (the entry functions and the helpers they call), not
            # as a whole, even where a module the stage runs imports the pipeline back.
            continue
        seen |= _with_parents(module)
        imported = _module_imports(module, root)
        if not scores and module.startswith(f"{_PACKAGE}.tasks"):
            imported = {m for m in imported if not m.startswith(f"{_PACKAGE}.metrics")}
        todo += [m for m in imported if m not in followed]
    return sorted(m for m in seen if m != f"{_PACKAGE}.pipeline" and not m.startswith(f"{_PACKAGE}.pipeline."))


def stage_digest(stage: str, root: str | Path | None = None) -> str:
    """16 hex digits of SHA-256 over the stage's entry source and the modules it can import."""
    root = Path(root).resolve() if root is not None else _ROOT
    sources, _ = _entry_sources(stage, root)
    h = hashlib.sha256()
    for source in sources:
        h.update(source.encode())
    for module in stage_modules(stage, root):
        h.update(module.encode() + b"\0" + _source_path(module, root).read_bytes())
    return h.hexdigest()[:16]
