"""Finetuning reads each step's images when the step needs them, and trains exactly as if the whole
split had been preprocessed first."""

from __future__ import annotations

import pytest
import torch

import vlmopt.finetune.full as full
from vlmopt.data.images import open_image
from vlmopt.finetune.config import FullFinetuneConfig
from vlmopt.finetune.full import finetune
from vlmopt.models import load_model
from vlmopt.models.encoding import pixel_values

# Two epochs in batches of 16 of the 64 training rows (x 2 tasks for BLIP: 8 steps an epoch, and
# batches with examples of both tasks on one row, one image serving two examples).
CONFIG = FullFinetuneConfig(epochs=2, batch_size=16, lr=2e-3, checkpoint_every=100, warmup_steps=2, max_steps=10)


def _weights(loaded):
    return {k: v.detach().clone() for k, v in loaded.model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _WholeSplitFirst(full._BatchImages):
    """The earlier way: every image of the split preprocessed up front (in chunks of 256), each
    step's pixel tensors picked from that cache."""

    def __init__(self, root, paths, schedule, steps, processor, dtype):
        super().__init__(root, paths, schedule, steps, processor, dtype)
        assert processor is not None
        images = [open_image(root, rel) for rel in self.paths]
        self.cache = torch.cat(
            [pixel_values(processor, images[s : s + 256], dtype) for s in range(0, len(images), 256)]
        )

    def __getitem__(self, step):
        rows = self.rows(step)
        return step, rows, self.cache[rows]


@pytest.mark.parametrize("family", ["blip", "clip"])
def test_streamed_batches_train_as_preprocessing_the_whole_split_first(
    family, shapes_texts, shapes_train, shapes_root, tmp_path, monkeypatch
):
    opened, preprocessed = [], []

    def counting_open(root, rel):
        opened.append(rel)
        return open_image(root, rel)

    def counting_pixels(processor, images, dtype):
        preprocessed.append(len(images))
        return pixel_values(processor, images, dtype)

    with monkeypatch.context() as m:
        m.setattr(full, "open_image", counting_open)
        m.setattr(full, "pixel_values", counting_pixels)
        streamed = load_model(f"tiny:{family}", texts=shapes_texts, seed=0)
        summary = finetune(streamed, shapes_train, shapes_root, CONFIG, checkpoint_dir=tmp_path / "a", progress=False)
    steps = summary["steps"]

    # One preprocessing call per step, over that step's distinct images only, each opened once.
    tasks = full.training_tasks(streamed, shapes_train, None)
    n_examples = len(shapes_train) * len(tasks)
    schedule = full._Schedule(CONFIG.seed, n_examples, CONFIG.batch_size, -(-n_examples // CONFIG.batch_size))
    distinct = [len({i % len(shapes_train) for i in schedule(step)}) for step in range(steps)]
    assert preprocessed == distinct and len(opened) == sum(distinct)
    assert max(preprocessed) <= CONFIG.batch_size
    if len(tasks) > 1:
        assert sum(distinct) < steps * CONFIG.batch_size  # some image served two examples of a batch

    monkeypatch.setattr(full, "_BatchImages", _WholeSplitFirst)
    reference = load_model(f"tiny:{family}", texts=shapes_texts, seed=0)
    finetune(reference, shapes_train, shapes_root, CONFIG, checkpoint_dir=tmp_path / "b", progress=False)
    _assert_same_weights(_weights(streamed), _weights(reference))


@pytest.mark.parametrize("family", ["blip", "pix2struct"])
def test_loader_workers_do_not_change_the_weights(family, shapes_texts, shapes_train, shapes_root, tmp_path):
    # pix2struct encodes each image with its text: its loader hands over decoded images.
    config = FullFinetuneConfig(epochs=1, batch_size=16, lr=2e-3, checkpoint_every=100, warmup_steps=2, max_steps=5)
    runs = []
    for workers in (0, 2):
        loaded = load_model(f"tiny:{family}", texts=shapes_texts, seed=0)
        finetune(
            loaded,
            shapes_train,
            shapes_root,
            config,
            checkpoint_dir=tmp_path / str(workers),
            progress=False,
            num_workers=workers,
        )
        runs.append(_weights(loaded))
    _assert_same_weights(*runs)


def test_image_text_families_get_each_examples_own_image(
    shapes_texts, shapes_train, shapes_root, tmp_path, monkeypatch
):
    loaded = load_model("tiny:pix2struct", texts=shapes_texts, seed=0)
    assert loaded.adapter.encodes_image_with_text
    real_encode = type(loaded.adapter).encode
    seen = []

    def encode(self, loaded, images, prompts, targets=None):
        seen.append((images, prompts))
        return real_encode(self, loaded, images, prompts, targets)

    monkeypatch.setattr(type(loaded.adapter), "encode", encode)
    config = FullFinetuneConfig(epochs=1, batch_size=16, lr=2e-3, checkpoint_every=100, max_steps=3)
    finetune(loaded, shapes_train, shapes_root, config, checkpoint_dir=tmp_path, progress=False)

    tasks = full.training_tasks(loaded, shapes_train, None)
    n_examples = len(shapes_train) * len(tasks)
    schedule = full._Schedule(config.seed, n_examples, config.batch_size, -(-n_examples // config.batch_size))
    examples = full._examples(loaded, shapes_train, tasks, 0)
    assert len(seen) == 3
    for step, (images, prompts) in enumerate(seen):
        batch = [examples[i] for i in schedule(step)]
        assert prompts == [p for _, p, _ in batch]
        expected = [open_image(shapes_root, shapes_train["image"].iloc[r]) for r, _, _ in batch]
        assert [im.tobytes() for im in images] == [im.tobytes() for im in expected]


def test_the_loader_leaves_the_global_random_stream_alone(blip2_opt, shapes_train, shapes_root):
    schedule = full._Schedule(seed=0, n_examples=len(shapes_train), batch_size=8, steps_per_epoch=8)
    dataset = full._BatchImages(shapes_root, shapes_train["image"], schedule, 4, blip2_opt.processor, torch.float32)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    batches = list(full._batch_loader(dataset, 1, 4, workers=0, pin=False))
    assert torch.equal(torch.get_rng_state(), before)
    assert [step for step, _, _ in batches] == [1, 2, 3]
    assert all(pixels.shape[0] == len(rows) <= 8 for _, rows, pixels in batches)
