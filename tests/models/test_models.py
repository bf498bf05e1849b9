"""Every registered family: tiny build, save -> reload, parts, and batch-size independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmopt.data.images import open_image
from vlmopt.infer import predict
from vlmopt.models import FAMILIES, load_model

#: Layers per part of each tiny model (vision, bridge, language); a new family adds its line here.
TINY_LAYERS = {
    "blip": (3, 0, 3),
    "blip-itm": (3, 0, 3),
    "blip2-opt": (3, 3, 3),
    # Retrieval BLIP-2: ViT and Q-Former, no language model.
    "blip2-itm": (3, 3, 0),
    # T5: 2 encoder blocks, then 2 decoder blocks.
    "blip2-t5": (3, 3, 4),
    "clip": (3, 0, 3),
    # Fuyu has no vision encoder: patches enter the decoder through one Linear.
    "fuyu": (0, 0, 3),
    "git": (3, 0, 3),
    "llava": (3, 0, 3),
    "pix2struct": (3, 0, 3),
    "qwen2_5_vl": (3, 0, 3),
}


def _generative(loaded) -> bool:
    return "captioning" in loaded.adapter.tasks


def _outputs(loaded, images, question):
    """Greedy captions and answers, or image/text embeddings (and ITM scores) for contrastive families."""
    adapter = loaded.adapter
    if _generative(loaded):
        outs = []
        for task, q in (("captioning", None), ("vqa", question)):
            enc = adapter.encode(loaded, images, [adapter.prompt(task, q)] * len(images))
            outs.append(adapter.generate(loaded, enc, max_new_tokens=3, num_beams=1, do_sample=False))
        return outs
    texts = ["a photo of a red circle.", question]
    with torch.no_grad():
        outs = [adapter.embed_images(loaded, images), adapter.embed_texts(loaded, texts)]
        if adapter.matches:
            outs.append(adapter.match(loaded, images[:2], texts))
    return outs


def test_every_family_is_described():
    assert set(TINY_LAYERS) == set(FAMILIES)
    # The family names, all registered.
    assert {"blip", "blip2-opt", "blip2-t5", "clip", "llava", "qwen2_5_vl", "git", "pix2struct", "fuyu"} <= set(
        FAMILIES
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_saves_and_reloads_with_identical_outputs(family, shapes_texts, shapes_root, shapes_test, tmp_path):
    loaded = load_model(f"tiny:{family}", texts=shapes_texts, seed=0)
    assert loaded.family == family
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert 50_000 < n_params < 500_000
    loaded.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    again = load_model(tmp_path / "m")
    assert again.family == family
    # A folder as the hub serves it (no vlmopt.json) is recognised from its config alone.
    (tmp_path / "m" / "vlmopt.json").unlink()
    assert load_model(tmp_path / "m").family == family
    for (k, a), b in zip(loaded.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k

    images = [open_image(shapes_root, p) for p in shapes_test["image"][:3]]
    question = shapes_test["question"][0]
    first, second = _outputs(loaded, images, question), _outputs(again, images, question)
    for a, b in zip(first, second, strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
        else:
            assert a == b
    if _generative(loaded):
        # The decoded answer holds the new tokens only, not the prompt (longer than 3 tokens for VQA).
        tok = loaded.tokenizer
        prompt = loaded.adapter.prompt("vqa", question)
        assert len(tok(prompt, add_special_tokens=False)["input_ids"]) > 3
        assert all(len(tok(o, add_special_tokens=False)["input_ids"]) <= 3 for o in first[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batch_of_8_gives_what_batch_of_1_gives(family, shapes_texts, shapes_root, shapes_test):
    loaded = load_model(f"tiny:{family}", texts=shapes_texts, seed=0)
    rows = shapes_test.iloc[:8]
    if _generative(loaded):
        # Questions of several token lengths: the pipeline must not let padding change an answer.
        lengths = {len(loaded.tokenizer(q)["input_ids"]) for q in rows["question"]}
        assert len(lengths) > 1
        runs = [
            predict(
                loaded, rows, shapes_root, task, batch_size=b, generate_kwargs={"max_new_tokens": 4}, progress=False
            )
            for task in ("vqa", "captioning")
            for b in (1, 8)
        ]
        assert list(runs[0]["prediction"]) == list(runs[1]["prediction"])
        assert list(runs[2]["prediction"]) == list(runs[3]["prediction"])
    else:
        for task in ("retrieval", "classification"):
            a, b = (
                predict(
                    loaded,
                    rows,
                    shapes_root,
                    task,
                    batch_size=size,
                    generate_kwargs={},
                    task_settings={"k": 4},
                    progress=False,
                )
                for size in (1, 8)
            )
            np.testing.assert_allclose(np.stack(a["scores"]), np.stack(b["scores"]), atol=1e-5)
            assert list(a["prediction"]) == list(b["prediction"])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parts_name_real_modules_in_order(family, shapes_texts):
    loaded = load_model(f"tiny:{family}", texts=shapes_texts)
    parts = loaded.parts()
    assert set(parts) == {"vision", "bridge", "language"}
    assert tuple(len(parts[p]) for p in ("vision", "bridge", "language")) == TINY_LAYERS[family]
    for layers in parts.values():
        stacks: dict[str, int] = {}
        for name, module in layers:
            assert loaded.model.get_submodule(name) is module
            # Within each layer list (stack), layers come in index order 0, 1, ...
            stack, _, index = name.rpartition(".")
            assert int(index) == stacks.get(stack, 0)
            stacks[stack] = int(index) + 1


def test_training_labels_mask_prompt_and_padding(shapes_texts):
    loaded = load_model("tiny:blip2-opt", texts=shapes_texts)
    prompt = loaded.adapter.prompt("vqa", "what color are the shapes?")
    enc = loaded.adapter.encode(loaded, None, [prompt, ""], ["red", "two red circles on the left"])
    ids, labels, mask = enc.inputs["input_ids"], enc.inputs["labels"], enc.inputs["attention_mask"]
    tok = loaded.tokenizer
    # Row 0: only "red" and the end token are learned; padding is masked out.
    learned = ids[0][labels[0] != -100].tolist()
    assert tok.convert_ids_to_tokens(learned) == ["red", "</s>"]
    assert (labels[mask == 0] == -100).all()
    # Image positions are never learned.
    assert (labels[ids == loaded.model.config.image_token_index] == -100).all()


def test_unknown_family_and_bad_folder_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        load_model("tiny:nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="dtype"):
        load_model("tiny:blip", dtype="int3")
