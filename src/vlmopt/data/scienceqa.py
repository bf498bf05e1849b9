"""ScienceQA (Lu et al. 2022, https://arxiv.org/abs/2209.09513), its questions with an image, from the Hugging Face hub.

The default ``hub_id`` is ``derek-thomas/ScienceQA`` (https://huggingface.co/datasets/derek-thomas/ScienceQA),
read with :mod:`vlmopt.data.hub` (a hub id, a local copy in the same layout, or a
``save_to_disk`` folder). Its published layout, as its dataset card (``dataset_info`` in
README.md, commit f18b0a7) and file listing give it: three parquet files
``data/train-00000-of-00001-1028f23e353fbe3e.parquet``,
``data/validation-00000-of-00001-6c7328ff6c84284c.parquet`` and
``data/test-00000-of-00001-f0e719df791966ff.parquet``, i.e. the splits ``train`` (12,726
questions), ``validation`` (4,241) and ``test`` (4,241), with the features ``image`` (an
``Image``, null for the questions without one), ``question``, ``choices`` (a sequence of
strings, two to five options), ``answer`` (int8, the index of the correct choice), ``hint``
(the text context, empty when there is none), ``task``, ``grade``, ``subject`` (``natural
science``, ``social science`` or ``language science``), ``topic``, ``category``, ``skill``,
``lecture`` and ``solution`` (strings).

Only the questions with an image are kept: ScienceQA's IMG subset, 6,218 train, 2,097
validation and 2,017 test questions (the counts of lmms-lab/ScienceQA's ``ScienceQA-IMG``
configuration, the same filter). Splits: ``train`` from ``train``, ``val`` from ``validation`` (``valid`` and
``val`` are read too), ``test`` from ``test``. Columns:

- ``sample_id``: ``<hub split>-<row index in the hub split>`` (e.g. ``test-17``), stable as long
  as the published files are; the hub copy does not carry ScienceQA's own problem ids.
- ``image``: the image's bytes, unchanged, at ``images/<split>/<row index><ending>``.
- ``question``: the prompt the model sees, in the format of LLaVA-1.5's ScienceQA evaluation
  (the ``CQM-A`` questions of ``llava_test_CQM-A.json`` with ``--single-pred-prompt`` in
  https://github.com/haotian-liu/LLaVA/blob/main/llava/eval/model_vqa_science.py, also lmms-eval's
  ``scienceqa_img`` task, lmms_eval/tasks/scienceqa/utils.py): ``Context: <hint>`` on its own
  line when the hint is not blank, then the question, then one line per option lettered
  ``A. ``, ``B. ``, ..., then ``Answer with the option's letter from the given choices directly.``
- ``answers``: a one-element list, the correct option's text.
- ``answer_type``: the question's ``subject``, so accuracies break down by subject as the
  official evaluation (lupantech/ScienceQA, tools/evaluate_acc.py) reports them; ``multiple
  choice`` when the subject is blank.
- ``choices``: the options' texts (whitespace collapsed); ``answer_index``: the correct one's
  position. Score these with :func:`vlmopt.metrics.multiple_choice_accuracy`.

``max_samples`` keeps a seeded subset of at most that many image questions in each split (rows in
hub order), and only those images are written.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from vlmopt.data.hub import (
    checked_splits,
    has_image,
    remove_stale_images,
    split_table,
    write_images,
)
from vlmopt.data.sources import deterministic_subset, write_splits

__all__ = ["HUB_ID", "HUB_SPLITS", "INSTRUCTION", "OPTION_LETTERS", "make_scienceqa", "scienceqa_prompt"]

log = logging.getLogger(__name__)

HUB_ID = "derek-thomas/ScienceQA"
#: Our split -> the hub split names it is read from (the first that exists).
HUB_SPLITS = {"train": ("train",), "val": ("validation", "valid", "val"), "test": ("test",)}
HUB_COLUMNS = ("image", "question", "choices", "answer", "hint", "subject")
TASKS = ("vqa",)
COLUMNS = {
    "sample_id": "object",
    "image": "object",
    "question": "object",
    "answers": "object",
    "answer_type": "object",
    "choices": "object",
    "answer_index": "int64",
}
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def _clean(text: object) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def scienceqa_prompt(question: str, choices: list[str], hint: str | None = None) -> str:
    """The prompt of one question: optional ``Context:`` line, question, lettered options, the instruction."""
    if len(choices) > len(OPTION_LETTERS):
        raise ValueError(f"a question has {len(choices)} choices; at most {len(OPTION_LETTERS)} can be lettered")
    lines = []
    context = (hint or "").strip()
    if context:
        lines.append(f"Context: {context}")
    lines.append(question.strip())
    lines.extend(f"{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def scienceqa_table(rows: pd.DataFrame, keep: list[bool], hub_id: str, hub_split: str) -> pd.DataFrame:
    """Table rows for the hub rows where ``keep`` is true, with the hub row position in ``_row``."""
    out = []
    for pos, row in enumerate(rows.itertuples(index=False)):
        if not keep[pos]:
            continue
        where = f"dataset {hub_id!r}, split {hub_split!r}, row {pos}"
        choices = [_clean(c) for c in (row.choices if row.choices is not None else [])]
        if not choices:
            raise ValueError(f"{where}: the question has no choices")
        try:
            answer = int(row.answer)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: 'answer' must be a choice index, got {row.answer!r}") from None
        if not 0 <= answer < len(choices):
            raise ValueError(f"{where}: 'answer' {answer} is not the index of one of its {len(choices)} choices")
        subject = _clean(row.subject)
        out.append(
            {
                "_row": pos,
                "sample_id": f"{hub_split}-{pos}",
                "question": scienceqa_prompt(str(row.question or ""), choices, row.hint),
                "answers": [choices[answer]],
                "answer_type": subject or "multiple choice",
                "choices": choices,
                "answer_index": answer,
            }
        )
    columns = ["_row", *[c for c in COLUMNS if c != "image"]]
    return pd.DataFrame(out, columns=columns).astype({"_row": "int64", "answer_index": "int64"})


def make_scienceqa(
    root: str | Path, *, seed: int = 0, hub_id: str = HUB_ID, max_samples: int | None = None
) -> dict[str, Path]:
    """Read ScienceQA from ``hub_id`` and write the image questions of train/val/test under ``root``."""
    root = Path(root)
    hub_id = str(hub_id)
    tables: dict[str, pd.DataFrame] = {}
    written: list[str] = []
    for split, hub_split, dataset in checked_splits(hub_id, HUB_SPLITS, HUB_COLUMNS):
        keep = has_image(dataset, "image").tolist()
        rows = split_table(dataset, ["question", "choices", "answer", "hint", "subject"])
        table = deterministic_subset(scienceqa_table(rows, keep, hub_id, hub_split), max_samples, seed=seed)
        positions = [int(r) for r in table["_row"]]
        table["image"] = write_images(
            dataset, "image", positions, [str(p) for p in positions], root, split, hub_id=hub_id
        )
        written.extend(table["image"])
        tables[split] = table.drop(columns="_row")[list(COLUMNS)]
        log.info(
            "scienceqa %s: %d image questions (of %d with an image, %d in all) from %s split %r",
            split,
            len(table),
            sum(keep),
            len(keep),
            hub_id,
            hub_split,
        )
    remove_stale_images(root, written)
    return write_splits(root, tables, TASKS, list(COLUMNS))
