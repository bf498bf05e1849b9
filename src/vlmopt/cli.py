"""``vlmopt <stage> ...``: every pipeline stage runnable by hand, through the same functions as the DAG."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmopt import __version__, pipeline

__all__ = ["main"]


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _steps(text: str) -> list:
    """A list of step mappings from a YAML/JSON file path or inline JSON/YAML text."""
    import yaml

    path = Path(text)
    try:
        source = path.read_text() if path.is_file() else text
        steps = yaml.safe_load(source)
    except (OSError, yaml.YAMLError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read steps from {text!r}: {exc}") from exc
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise argparse.ArgumentTypeError(f"steps must be a list of mappings, got {type(steps).__name__} from {text!r}")
    return steps


def _default(function: Callable[..., Any], name: str) -> Any:
    """The default of ``function``'s parameter ``name``: an option left out means what the library does."""
    return inspect.signature(function).parameters[name].default


def _seed_option(p: argparse.ArgumentParser, function: Callable[..., Any]) -> None:
    p.add_argument("--seed", type=int, default=_default(function, "seed"), help="random seed (default: %(default)s)")


def _device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        help="auto (a GPU where torch sees one, else the CPU), cpu, cuda or cuda:N; default: $VLMOPT_DEVICE, else auto",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmopt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vlmopt {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True)

    p = sub.add_parser("prepare-dataset", help="create a dataset's split tables and images")
    p.add_argument("name")
    p.add_argument("--settings", type=_json, default={}, help='JSON, e.g. {"source": "synthetic"} (the default source)')
    _seed_option(p, pipeline.prepare_dataset)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("label-dataset", help="real-vs-generated label texts (and exp2_*.csv) from a labelled dataset")
    p.add_argument("source", type=Path, help="folder of a dataset labelled 0 real / 1 generated (its split tables)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--captioner", type=Path, help="a saved model folder that captions each image (optional)")
    p.add_argument(
        "--settings", type=_json, default={}, help='captioner settings, e.g. {"reason": true, "batch_size": 64}'
    )
    _device_option(p)

    p = sub.add_parser("build-model", help="build tiny:<family> or fetch a hub id, and save it")
    p.add_argument("source")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer-table", type=Path, help="train split whose text trains a tiny model's tokenizer")
    p.add_argument("--settings", type=_json, default={})
    _seed_option(p, pipeline.build_model)

    p = sub.add_parser("finetune", help="full finetuning with checkpoints")
    p.add_argument("model", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-table", type=Path, required=True)
    p.add_argument("--settings", type=_json, default={})
    p.add_argument("--checkpoints", type=Path, required=True)
    _seed_option(p, pipeline.finetune_model)
    _device_option(p)

    p = sub.add_parser("compress", help="apply compression steps and write manifest.json")
    p.add_argument("--model", type=Path, required=True, help="model folder (built, finetuned or downloaded)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--steps",
        type=_steps,
        required=True,
        help='a YAML or JSON file with a list of steps, or the list inline: \'[{"method": "uniform", ...}]\'',
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=_default(pipeline.compress_model, "data_root"),
        help="where calibration datasets live (default: %(default)s)",
    )
    _device_option(p)

    p = sub.add_parser(
        "export",
        help="the packed low-bit model of a variant folder (compressed-tensors), for transformers or vLLM",
    )
    p.add_argument("variant", type=Path, help="a compressed model folder (results/models/...)")
    p.add_argument("--out", type=Path, required=True, help="a new folder")

    p = sub.add_parser(
        "infer", help="predict one shard of a dataset split (under torchrun, its processes split the shard)"
    )
    p.add_argument("model", type=Path)
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--shard", default="1-of-1")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--settings",
        type=_json,
        default={},
        help='JSON, e.g. {"batch_size": 8, "num_beams": 3} (default: vlmopt.infer.INFERENCE_DEFAULTS)',
    )
    p.add_argument(
        "--task-settings", type=_json, default={}, help='similarity tasks: e.g. {"k": 128} or {"templates": [...]}'
    )
    p.add_argument(
        "--dataset-root", type=Path, help="folder the table's image paths are relative to (default: its own)"
    )
    _device_option(p)

    p = sub.add_parser("score", help="score predictions on CPU")
    p.add_argument("predictions", type=Path)
    p.add_argument("--table", type=Path, required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("plots", help="figures from a summary table")
    p.add_argument("summary", type=Path)
    p.add_argument("--out", type=Path, required=True)

    p = sub.add_parser("report", help="one self-contained HTML report from a study's result tables")
    p.add_argument("--tables", type=Path, default=Path("results/tables"), help="folder of summary.parquet ...")
    p.add_argument("--out", type=Path, required=True, help="folder for index.html and the tables it links")
    p.add_argument("--config", type=Path, help="the study file, shown in the report")
    p.add_argument(
        "--predictions",
        type=Path,
        help="folder of the predictions, for the before/after examples (default: predictions beside --tables)",
    )
    p.add_argument(
        "--data", type=Path, default=Path("resources/data"), help="folder of the prepared datasets (their images)"
    )
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="COST=LIMIT[,LIMIT...]",
        help="limits of a budget table, e.g. nominal_size_bytes=2e8 or latency_ms_per_sample_p50=50,100 "
        "(repeatable; default: 0.25, 0.5 and 1 times the most expensive baseline's cost)",
    )
    return parser


def _budgets(specs: list[str]) -> dict[str, list[float]] | None:
    from vlmopt.plots.budget import BUDGET_COSTS

    if not specs:
        return None
    budgets: dict[str, list[float]] = {}
    for spec in specs:
        cost, sep, limits = spec.partition("=")
        try:
            budgets[cost] = [float(x) for x in limits.split(",")] if sep else []
        except ValueError:
            budgets[cost] = []
        if not budgets[cost]:
            raise SystemExit(f"--budget {spec!r}: expected COST=LIMIT[,LIMIT...], e.g. nominal_size_bytes=2e8")
        if cost not in BUDGET_COSTS:
            raise SystemExit(f"--budget {spec!r}: unknown cost {cost!r}; known: {', '.join(sorted(BUDGET_COSTS))}")
    return budgets


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.stage == "prepare-dataset":
        pipeline.prepare_dataset(args.name, args.settings, args.out, seed=args.seed)
    elif args.stage == "label-dataset":
        captioner = {"model": str(args.captioner), **args.settings} if args.captioner else None
        settings = {"source": "labeled", "dataset": args.source.name, "captioner": captioner}
        pipeline.label_dataset(
            args.out.name, settings, args.source, args.out, captioner_dir=args.captioner, device=args.device
        )
    elif args.stage == "build-model":
        pipeline.build_model(
            args.source, args.out, settings=args.settings, tokenizer_table=args.tokenizer_table, seed=args.seed
        )
    elif args.stage == "finetune":
        pipeline.finetune_model(
            args.model,
            args.out,
            settings=args.settings,
            train_table=args.train_table,
            dataset_root=args.train_table.parent,
            checkpoint_dir=args.checkpoints,
            seed=args.seed,
            device=args.device,
        )
    elif args.stage == "compress":
        pipeline.compress_model(args.model, args.out, steps=args.steps, data_root=args.data_root, device=args.device)
    elif args.stage == "export":
        from vlmopt.compress.saved import NotExportable, export_variant

        try:
            print(export_variant(args.variant, args.out))
        except NotExportable as err:
            sys.exit(f"vlmopt export: {err}")
    elif args.stage == "infer":
        from vlmopt.infer import INFERENCE_DEFAULTS

        settings = INFERENCE_DEFAULTS | args.settings
        pipeline.predict_shard(
            args.model,
            args.table,
            args.dataset_root or args.table.parent,
            args.out,
            task=args.task,
            shard=args.shard,
            settings=settings,
            task_settings=args.task_settings or None,
            device=args.device,
        )
    elif args.stage == "score":
        keys = {"model": "", "ft": "", "variant": "", "task": args.task, "dataset": args.table.parent.name}
        metrics = pipeline.score_predictions(args.predictions, args.table, args.out, keys=keys, settings={})
        json.dump(metrics, sys.stdout, indent=2)
        print()
    elif args.stage == "plots":
        for path in pipeline.build_plots(args.summary, args.out):
            print(path)
    elif args.stage == "report":
        import yaml

        from vlmopt.report import build_report

        config = yaml.safe_load(args.config.read_text()) if args.config else None
        report = build_report(
            args.tables,
            args.out,
            config=config,
            budgets=_budgets(args.budget),
            predictions=args.predictions,
            data=args.data,
        )
        print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
