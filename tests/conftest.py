"""Shared fixtures: a small shapes dataset and tiny models built from it, once per session."""

from __future__ import annotations

import os

import pandas as pd
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    from vlmopt.data import make_shapes

    root = tmp_path_factory.mktemp("shapes")
    make_shapes(root, seed=0, n_train=64, n_val=8, n_test=24, image_size=64)
    return root


@pytest.fixture(scope="session")
def shapes_test(shapes_root) -> pd.DataFrame:
    return pd.read_parquet(shapes_root / "test.parquet")


@pytest.fixture(scope="session")
def shapes_train(shapes_root) -> pd.DataFrame:
    return pd.read_parquet(shapes_root / "train.parquet")


@pytest.fixture(scope="session")
def shapes_texts(shapes_train) -> list[str]:
    from vlmopt.data import dataset_texts

    return dataset_texts(shapes_train)


@pytest.fixture(scope="session")
def write_predictions():
    """A function that writes a predictions table where the pipeline keeps it,
    ``<root>/<model>/<ft>/<variant>/<task>/<dataset>/predictions.parquet``, and returns the file."""
    from pathlib import Path

    def write(root, model: str, ft: str, variant: str, task: str, dataset: str, frame: pd.DataFrame) -> Path:
        path = Path(root) / model / ft / variant / task / dataset / "predictions.parquet"
        path.parent.mkdir(parents=True)
        frame.to_parquet(path)
        return path

    return write


@pytest.fixture(scope="session")
def blip2_opt(shapes_texts):
    """A tiny BLIP-2 (OPT) with the shapes vocabulary (read-only: tests must not change it)."""
    from vlmopt.models import load_model

    return load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)


@pytest.fixture(scope="session")
def blip2_calibration(blip2_opt, shapes_train, shapes_root):
    """Twelve calibration samples of the shapes training split, encoded for :func:`blip2_opt`."""
    from vlmopt.compress.calibration import Calibration
    from vlmopt.tasks.encode import calibration_batches

    return Calibration(*calibration_batches(blip2_opt, shapes_train, shapes_root, n_samples=12, batch_size=4, seed=0))
