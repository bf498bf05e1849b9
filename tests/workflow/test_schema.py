"""The study schema writes each default and name list as the library does.

Validation fills in no defaults (rules/common.smk: ``set_default=False``): the library owns them,
since it runs without Snakemake, and a ``default`` in the schema documents the library's value.
Each one must therefore equal the value the library uses where a study leaves the setting out,
and each list of names a study may use (dataset sources, tasks, splits ...) must equal the
library's. No Snakemake run: the schema is read as YAML and the library imported.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _defaults(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, default) of every ``default`` under ``node``: ``datasets.*.n_train``, ``runs[].models`` ..."""
    if isinstance(node, list):
        for item in node:
            yield from _defaults(item, path)
        return
    if not isinstance(node, dict):
        return
    if "default" in node:
        yield path, node["default"]
    for name, sub in (node.get("properties") or {}).items():
        yield from _defaults(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _defaults(node["additionalProperties"], f"{path}.*")
    if isinstance(node.get("items"), dict):
        yield from _defaults(node["items"], f"{path}[]")
    for key in ("oneOf", "anyOf", "allOf"):
        yield from _defaults(node.get(key, []), path)


def _at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    """The schema of the setting at ``path`` (the notation of :func:`_defaults`)."""
    node = schema
    for part in path.replace("[]", ".[]").split("."):
        if part == "*":
            node = node["additionalProperties"]
        elif part == "[]":
            node = node["items"]
        else:
            node = node["properties"][part]
    return node


def _argument(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s keyword ``name``."""
    default = inspect.signature(function).parameters[name].default
    assert default is not inspect.Parameter.empty, f"{function.__qualname__}({name}) has no default"
    return default


def _field(cls: type, name: str) -> Any:
    """The default of dataclass ``cls``'s field ``name``."""
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    assert default is not dataclasses.MISSING, f"{cls.__qualname__}.{name} has no default"
    return default


def _seed() -> int:
    """The seed of every pipeline stage that takes one, when the study gives none (one value for all)."""
    from vlmopt import pipeline

    stages = (pipeline.prepare_dataset, pipeline.build_model, pipeline.finetune_model)
    seeds = {stage.__name__: _argument(stage, "seed") for stage in stages}
    assert len(set(seeds.values())) == 1, f"the stages default to different seeds: {seeds}"
    return next(iter(seeds.values()))


def library_defaults() -> dict[str, Any]:
    """Schema path -> the library's default of that setting."""
    from vlmopt.data.labeling import CAPTIONER_DEFAULTS
    from vlmopt.data.synthetic import make_shapes
    from vlmopt.finetune import FullFinetuneConfig
    from vlmopt.infer import INFERENCE_DEFAULTS
    from vlmopt.models import load_model
    from vlmopt.profiling.variant import DEFAULTS as PROFILING_DEFAULTS
    from vlmopt.study.exports import EXPORT_ENABLED
    from vlmopt.study.runs import PROFILING_ENABLED
    from vlmopt.tasks import DEFAULT_TEMPLATES

    finetune = ("epochs", "lr", "batch_size", "weight_decay", "checkpoint_every", "warmup_steps", "max_steps")
    return {
        "seed": _seed(),
        "export": EXPORT_ENABLED,
        **{f"datasets.*.captioner.{k}": v for k, v in CAPTIONER_DEFAULTS.items()},
        **{
            f"datasets.*.{k}": _argument(make_shapes, k) for k in ("labels", "n_train", "n_val", "n_test", "image_size")
        },
        "datasets.*.templates": list(DEFAULT_TEMPLATES),
        "models.*.image_size": _argument(load_model, "image_size"),
        "models.*.trust_remote_code": _argument(load_model, "trust_remote_code"),
        **{f"finetune.*.{k}": _field(FullFinetuneConfig, k) for k in finetune},
        **{f"inference.{k}": v for k, v in INFERENCE_DEFAULTS.items()},
        "profiling.enabled": PROFILING_ENABLED,
        **{f"profiling.{k}": v for k, v in PROFILING_DEFAULTS.items()},
    }


@pytest.fixture(scope="module")
def library() -> dict[str, Any]:
    return library_defaults()


def _same(a: Any, b: Any) -> bool:
    """Equal values of one type (True is not 1, nor 1 the float 1.0); lists and tuples item by item."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def default_problems(schema: dict[str, Any], library: dict[str, Any]) -> list[str]:
    """One line per schema default that the library does not have, or has with another value."""
    problems = []
    for path, default in _defaults(schema):
        if path not in library:
            problems.append(f"{path}: default {default!r} is no library default (map it in this test, or drop it)")
        elif not _same(default, library[path]):
            problems.append(f"{path}: the schema's default {default!r} is not the library's {library[path]!r}")
    return problems


def test_every_schema_default_is_the_librarys(schema, library):
    problems = default_problems(schema, library)
    assert not problems, "\n".join(["", *problems])


def test_the_schema_writes_every_library_default(schema, library):
    """A default the library has for a study setting is in the schema too (documented, and checked)."""
    written = dict(_defaults(schema))
    assert [path for path in library if path not in written] == []


def test_the_check_names_a_changed_or_unowned_default(schema, library):
    changed = copy.deepcopy(schema)
    _at(changed, "inference.num_beams")["default"] = 4
    _at(changed, "finetune.*.weight_decay")["default"] = 0  # an int where the library has the float 0.0
    _at(changed, "runs[].variants")["default"] = "all"
    assert default_problems(changed, library) == [
        "finetune.*.weight_decay: the schema's default 0 is not the library's 0.0",
        "runs[].variants: default 'all' is no library default (map it in this test, or drop it)",
        "inference.num_beams: the schema's default 4 is not the library's 1",
    ]


def _enum(schema: dict[str, Any], path: str) -> list[Any]:
    return _at(schema, path)["enum"]


def _key_names(schema: dict[str, Any], path: str) -> list[Any]:
    """The names the mapping at ``path`` allows as keys."""
    return _at(schema, path)["propertyNames"]["enum"]


def test_dataset_sources_are_the_librarys(schema):
    from vlmopt.data import DATASETS
    from vlmopt.data.labeling import LABELED_SOURCE

    # Each registered dataset is prepared from its source; a labeled one is made from another dataset.
    sources = {spec.source for spec in DATASETS.values()} | {LABELED_SOURCE}
    assert sorted(_enum(schema, "datasets.*.source")) == sorted(sources)


def test_task_names_live_in_the_registry_only(schema):
    # Adding a task touches vlmopt.tasks only: where a study names tasks, the schema lists none, and
    # the study check (tests/study/test_checks.py) rejects a name the registry does not hold.
    assert "enum" not in _at(schema, "finetune.*.tasks[]")
    assert "propertyNames" not in _at(schema, "runs[].tasks")
    assert "propertyNames" not in _at(schema, "inference.generation")


def test_splits_and_label_kinds_are_the_librarys(schema):
    from vlmopt.data import SPLITS
    from vlmopt.data.synthetic import LABEL_KINDS

    assert _enum(schema, "datasets.*.splits[]") == list(SPLITS)
    assert _enum(schema, "inference.split") == list(SPLITS)
    assert _enum(schema, "datasets.*.labels") == list(LABEL_KINDS)


def test_dtypes_and_sweep_axes_are_the_librarys(schema):
    from vlmopt.models import DTYPES
    from vlmopt.study import ATTENTION, AXES, DTYPE_NAMES

    assert _enum(schema, "models.*.dtype") == list(DTYPES)
    assert list(_at(schema, "profiling.sweep")["properties"]) == list(AXES)
    assert _enum(schema, "profiling.sweep.dtype[]") == list(DTYPE_NAMES)
    assert _enum(schema, "profiling.sweep.attn_implementation[]") == list(ATTENTION)
