"""Tasks scored from image-text similarities: retrieval (recall@k) and zero-shot classification (top-k)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from vlmopt.tasks.base import Task

if TYPE_CHECKING:
    import numpy as np

    from vlmopt.models.base import FamilyAdapter

__all__ = ["DEFAULT_TEMPLATES", "ClassificationTask", "RetrievalTask", "score_matrix"]

#: CLIP's default zero-shot prompt (Radford et al. 2021, section 3.1.4).
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def score_matrix(predictions: pd.DataFrame, table: pd.DataFrame, column: str, width: int) -> np.ndarray:
    """The predictions' score lists in ``column`` as a (rows of ``table``, ``width``) matrix, NaN rows
    for samples without scores; a list of another length is an error naming the sample."""
    import numpy as np

    by_id = {sid: i for i, sid in enumerate(predictions["sample_id"])}
    out = np.full((len(table), width), np.nan)
    for row, sid in enumerate(table["sample_id"]):
        i = by_id[sid]
        values = predictions[column].iloc[i]
        if values is not None and not (isinstance(values, float) and np.isnan(values)):
            if len(values) != width:
                raise ValueError(
                    f"{column} of {predictions['sample_id'].iloc[i]!r} has {len(values)} values, not {width}"
                )
            out[row] = values
    return out


class RetrievalTask(Task):
    """Image-text retrieval over every caption of a split: each image's scores against all captions."""

    name = "retrieval"
    columns = ("captions",)
    kind = "similarity"
    headline = "r_mean"
    headline_label = "retrieval mean recall (%)"
    metrics = ("r_mean",)

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return self.targets(df, 0)

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        return [list(caps)[(epoch + i) % len(caps)] for i, caps in enumerate(df["captions"])]

    def inference_settings(self, dataset: dict[str, Any], inference: dict[str, Any]) -> dict[str, Any]:
        """Re-ranking depth: the ITM head re-scores each image's ``retrieval_k`` best texts (0: none)."""
        return {"k": inference["retrieval_k"]}

    @staticmethod
    def texts(df: pd.DataFrame) -> tuple[list[str], list[int]]:
        """Every caption of ``df`` in row order, and the row index of the image each belongs to."""
        texts, owners = [], []
        for row, caps in enumerate(df["captions"]):
            texts.extend(caps)
            owners.extend([row] * len(caps))
        return texts, owners

    def score(self, predictions: pd.DataFrame, table: pd.DataFrame, *, source: str = "") -> dict[str, float]:
        """Recall@1/5/10 in both directions and their mean, from the image-to-text and text-to-image scores."""
        from vlmopt.metrics import retrieval_recall

        texts, owners = self.texts(table)
        img2txt: list[list[int]] = [[] for _ in range(len(table))]
        for j, row in enumerate(owners):
            img2txt[row].append(j)
        i2t = score_matrix(predictions, table, "scores", len(texts))
        t2i = score_matrix(predictions, table, "scores_t2i", len(texts)).T
        return retrieval_recall(i2t, t2i, img2txt, owners)


class ClassificationTask(Task):
    """Zero-shot classification: an image against one text per class (an ensemble of templates)."""

    name = "classification"
    columns = ("label", "label_name")
    kind = "similarity"
    headline = "top1"
    headline_label = "top-1 accuracy (%)"
    metrics = ("top1", "top5")

    def prompts(self, df: pd.DataFrame, adapter: FamilyAdapter) -> list[str]:
        return self.targets(df, 0)

    def targets(self, df: pd.DataFrame, epoch: int) -> list[str]:
        return [DEFAULT_TEMPLATES[0].format(name) for name in df["label_name"]]

    def inference_settings(self, dataset: dict[str, Any], inference: dict[str, Any]) -> dict[str, Any]:
        """The dataset's prompt templates (CLIP's prompt ensembling), by default :data:`DEFAULT_TEMPLATES`."""
        return {"templates": list(dataset.get("templates", DEFAULT_TEMPLATES))}

    @staticmethod
    def classes(df: pd.DataFrame) -> tuple[list[int], list[str]]:
        """The labels of ``df`` in ascending order and their names; a label with two names is an error."""
        names: dict[int, str] = {}
        for label, name in zip(df["label"], df["label_name"], strict=True):
            if names.setdefault(int(label), name) != name:
                raise ValueError(f"label {int(label)} has two names: {names[int(label)]!r} and {name!r}")
        labels = sorted(names)
        return labels, [names[label] for label in labels]

    @staticmethod
    def class_texts(names: list[str], templates: tuple[str, ...] | list[str] = DEFAULT_TEMPLATES) -> list[list[str]]:
        """Per class, its name set in each template (``{}`` marks where the name goes)."""
        templates = list(templates)
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError(f"templates must each hold one '{{}}' for the class name, got {templates}")
        return [[t.format(name) for t in templates] for name in names]

    def score(self, predictions: pd.DataFrame, table: pd.DataFrame, *, source: str = "") -> dict[str, float]:
        """Top-1 and top-5 accuracy; for real-vs-generated labels also the binary report of
        :mod:`vlmopt.metrics.real_vs_generated` (an image without scores counts as unparsed)."""
        import numpy as np

        from vlmopt.metrics import topk_accuracy

        labels, names = self.classes(table)
        index = {label: i for i, label in enumerate(labels)}
        scores = score_matrix(predictions, table, "scores", len(labels))
        metrics = topk_accuracy(scores, [index[int(y)] for y in table["label"]])
        if labels == [0, 1] and names == ["real", "generated"]:
            # Real vs generated: the same report as the generative classifiers (an unread image is unparsed).
            from vlmopt.metrics.real_vs_generated import binary_report

            chosen = [None if np.isnan(row).all() else int(np.argmax(row)) for row in scores]
            metrics |= binary_report([int(y) for y in table["label"]], chosen)
        return metrics
