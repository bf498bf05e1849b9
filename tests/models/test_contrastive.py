"""Training the contrastive families (CLIP, BLIP retrieval): their losses, and that training helps retrieval."""

from __future__ import annotations

import math

import pytest
import torch

from vlmopt.finetune.full import FullFinetuneConfig, finetune
from vlmopt.infer import predict
from vlmopt.models import load_model
from vlmopt.models.clip import contrastive_loss
from vlmopt.tasks import RetrievalTask, get_task


def test_contrastive_loss_counts_identical_captions_as_positives():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    unique = torch.tensor([[1, 5, 2], [1, 6, 2]])
    # Unique texts: cross-entropy against the diagonal, both ways.
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert float(contrastive_loss(logits, unique)) == pytest.approx(expected)
    # One caption for both images: each row's target is half on each text.
    same = torch.tensor([[1, 5, 2], [1, 5, 2]])
    p, q = math.exp(2) / (math.exp(2) + 1), 1 / (math.exp(2) + 1)
    assert float(contrastive_loss(logits, same)) == pytest.approx(-(math.log(p) + math.log(q)) / 2)


def test_clip_loss_is_clips_own_on_unique_captions(shapes_texts, shapes_root, shapes_train):
    loaded = load_model("tiny:clip", texts=shapes_texts, seed=0)
    rows = shapes_train.drop_duplicates("color").iloc[:4]
    images, captions = _pairs(shapes_root, rows)
    encoded = loaded.adapter.encode(loaded, images, captions, captions)
    assert len({tuple(r) for r in encoded.inputs["input_ids"].tolist()}) == 4
    with torch.no_grad():
        own = loaded.model(**encoded.inputs, return_loss=True).loss
        ours = loaded.adapter.loss(loaded, encoded)
    torch.testing.assert_close(ours, own)


def test_blip_itm_loss_trains_both_heads(shapes_texts, shapes_root, shapes_train):
    loaded = load_model("tiny:blip-itm", texts=shapes_texts, seed=0)
    images, captions = _pairs(shapes_root, shapes_train.iloc[:16])
    encoded = loaded.adapter.encode(loaded, images, captions, captions)
    model = loaded.model
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(60):
        loss = loaded.adapter.loss(loaded, encoded)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            # ITC and ITM both reach the weights: projections and the matching head get gradients.
            for name in ("vision_proj.weight", "text_proj.weight", "itm_head.weight"):
                assert model.get_parameter(name).grad.abs().sum() > 0, name
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def _pairs(root, rows):
    from vlmopt.data.images import open_image

    return [open_image(root, p) for p in rows["image"]], [list(c)[0] for c in rows["captions"]]


def test_finetuning_clip_improves_held_out_retrieval(shapes_texts, shapes_root, shapes_train, shapes_test, tmp_path):
    loaded = load_model("tiny:clip", texts=shapes_texts, seed=0)

    def r_mean():
        df = predict(loaded, shapes_test, shapes_root, "retrieval", batch_size=24, generate_kwargs={}, progress=False)
        return get_task("retrieval").score(df, shapes_test)["r_mean"]

    before = r_mean()
    config = FullFinetuneConfig.from_dict({"epochs": 15, "lr": 2e-3, "batch_size": 16})
    summary = finetune(loaded, shapes_train, shapes_root, config, checkpoint_dir=tmp_path, progress=False)
    after = r_mean()
    texts, _ = RetrievalTask.texts(shapes_test)
    # 24 test images, 120 captions: chance mean recall is far below what training reaches.
    assert len(texts) == 120
    assert summary["last_loss"] < summary["first_loss"]
    assert after > before + 10, (before, after)
