from __future__ import annotations

import pytest
import torch

from vlmopt.models import FAMILIES, load_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tiny_model_saves_and_reloads_with_identical_generation(
    family, shapes_texts, shapes_root, shapes_test, tmp_path
):
    from vlmopt.data.images import open_image

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
    q = shapes_test["question"][0]
    for task, question in (("captioning", None), ("vqa", q)):
        prompt = loaded.adapter.prompt(task, question)
        outs = []
        for lm in (loaded, again):
            enc = lm.adapter.encode(lm, images, [prompt] * 3)
            outs.append(lm.adapter.generate(lm, enc, max_new_tokens=3, num_beams=1, do_sample=False))
        assert outs[0] == outs[1]
        # The decoded answer holds the new tokens only, not the prompt (longer than 3 tokens for VQA).
        tok = loaded.tokenizer
        assert len(tok(prompt, add_special_tokens=False)["input_ids"]) > 3 or task == "captioning"
        assert all(len(tok(o, add_special_tokens=False)["input_ids"]) <= 3 for o in outs[0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_parts_name_real_modules_in_order(family, shapes_texts):
    loaded = load_model(f"tiny:{family}", texts=shapes_texts)
    parts = loaded.parts()
    assert set(parts) == {"vision", "bridge", "language"}
    # Every tiny model has 3 layers per part; BLIP-2 with T5 lists 2 encoder then 2 decoder blocks.
    assert len(parts["vision"]) == 3 and len(parts["language"]) == (4 if family == "blip2-t5" else 3)
    assert len(parts["bridge"]) == (3 if family.startswith("blip2") else 0)
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
