"""LoRA recovery on the tiny models: only adapters train, merge is exact, kept adapters reload."""

from __future__ import annotations

import pytest
import torch

from vlmopt.compress import TrainingData, apply_variant, compress
from vlmopt.compress.saved import load_variant
from vlmopt.finetune.full import finetune
from vlmopt.models import load_model
from vlmopt.pipeline import compress_model

TARGETS = ["q_proj", "k_proj", "query", "key"]


def _lora(merge: bool, **extra) -> dict:
    return {
        "method": "lora",
        "r": 4,
        "alpha": 8,
        "dropout": 0.0,
        "targets": TARGETS,
        "dataset": "shapes",
        "merge": merge,
        "training": {"max_steps": 12, "lr": 1.0e-2, "batch_size": 8, "warmup_steps": 1},
        **extra,
    }


def _provider(loaded, shapes_train, shapes_root):
    return lambda spec: TrainingData(loaded, shapes_train, shapes_root, fit=finetune)


def _logits(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**batch).logits


@pytest.fixture(scope="module")
def batch(blip2_dir, shapes_test, shapes_root):
    from vlmopt.tasks.encode import calibration_batches

    batches, _ = calibration_batches(load_model(blip2_dir), shapes_test, shapes_root, n_samples=8, batch_size=8)
    return batches[0]


@pytest.fixture(scope="module")
def merged(blip2_dir, shapes_train, shapes_root):
    loaded = load_model(blip2_dir)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    manifest = compress(loaded, [_lora(True)], training=_provider(loaded, shapes_train, shapes_root))
    return loaded, before, manifest


def test_merged_lora_changes_exactly_the_targets(merged):
    loaded, before, manifest = merged
    config = loaded.model.config
    # Hand count from the config: OPT q/k per layer, Q-Former self-attention query/key per layer and
    # cross-attention query/key every cross_attention_frequency-th layer; BLIP-2's ViT has a fused qkv.
    q_layers = config.qformer_config.num_hidden_layers
    cross = len(range(0, q_layers, config.qformer_config.cross_attention_frequency))
    expected = 2 * config.text_config.num_hidden_layers + 2 * q_layers + 2 * cross
    names = [m["name"] for m in manifest.changed]
    assert len(names) == expected
    assert {n.rpartition(".")[2] for n in names} == set(TARGETS)
    after = loaded.model.state_dict()
    assert sorted(after) == sorted(before), "merging must leave the original architecture"
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {f"{n}.weight" for n in names}
    training = manifest.steps[0]["structure"]
    assert training["steps"] == 12 and training["trainable_params"] == sum(
        4 * (m.in_features + m.out_features) for m in (loaded.model.get_submodule(n) for n in names)
    )


def test_kept_adapter_computes_what_the_merged_model_does_and_reloads(merged, blip2_dir, data_root, batch, tmp_path):
    merged_model = merged[0]
    out = tmp_path / "kept"
    manifest = compress_model(blip2_dir, out, steps=[_lora(False)], data_root=data_root)
    assert (out / "lora_adapter" / "adapter.safetensors").is_file()
    reloaded = load_variant(out)
    assert any("lora_A" in n for n, _ in reloaded.model.named_parameters())
    # Same seed, same data: the kept adapter is the one that was merged, so outputs agree.
    torch.testing.assert_close(_logits(reloaded, batch), _logits(merged_model, batch), rtol=1e-4, atol=1e-5)
    base = load_model(blip2_dir)
    assert not torch.allclose(_logits(base, batch), _logits(reloaded, batch), atol=1e-4)
    added = manifest["parameters"]["model"]["total"] - sum(p.numel() for p in base.model.parameters())
    assert added == manifest["steps"][0]["structure"]["trainable_params"]


def test_merged_folder_reloads_identically(merged, blip2_dir, data_root, batch, tmp_path):
    out = tmp_path / "merged"
    compress_model(blip2_dir, out, steps=[_lora(True)], data_root=data_root)
    assert not (out / "lora_adapter").exists()
    torch.testing.assert_close(_logits(load_variant(out), batch), _logits(merged[0], batch))


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ([_lora(True, rank=4)], "unknown setting"),
        ([_lora(True, targets=["fc9"])], r"targets \['fc9'\] match no selected"),
        ([_lora(True, training={"epoch": 1})], "unknown training setting"),
        ([{"method": "uniform", "bits": 4, "part": "language"}, _lora(True)], "off their grid"),
        ([_lora(False), {"method": "uniform", "bits": 4, "part": "language"}], "must be the\nlast step|last step"),
        ([_lora(True, r=0)], "r must be a positive integer"),
    ],
)
def test_bad_lora_steps_are_named(blip2_dir, shapes_train, shapes_root, steps, match):
    loaded = load_model(blip2_dir)
    with pytest.raises(ValueError, match=match):
        apply_variant(loaded.model, loaded.parts(), steps, training=_provider(loaded, shapes_train, shapes_root))


def test_lora_needs_training_data(blip2_dir):
    loaded = load_model(blip2_dir)
    with pytest.raises(ValueError, match="trains on a dataset, and none was given"):
        apply_variant(loaded.model, loaded.parts(), [_lora(True)])


def _caption_loss(loaded, df, root) -> float:
    from vlmopt.data.images import open_image
    from vlmopt.tasks import get_task

    task = get_task("captioning")
    images = [open_image(root, rel) for rel in df["image"]]
    encoded = loaded.adapter.encode(loaded, images, task.prompts(df, loaded.adapter), task.targets(df, 0))
    with torch.no_grad():
        return float(loaded.model(**encoded.inputs).loss)


def test_lora_recovers_part_of_what_pruning_lost(blip2_dir, shapes_train, shapes_test, shapes_root):
    # The RSICD study's recipe: drop a language layer, then train LoRA adapters on what is left.
    prune = {"method": "prune_layers", "part": "language", "layers": [1]}
    pruned = load_model(blip2_dir)
    apply_variant(pruned.model, pruned.parts(), [prune])
    recovered = load_model(blip2_dir)
    recovery = {
        "method": "lora",
        "part": "language",
        "r": 8,
        "alpha": 16,
        "dropout": 0.0,
        "dataset": "shapes",
        "training": {"max_steps": 40, "lr": 2.0e-2, "batch_size": 8, "tasks": ["captioning"]},
    }
    manifest = compress(recovered, [prune, recovery], training=_provider(recovered, shapes_train, shapes_root))
    # Every Linear of the remaining language layer (q, k, v, out, fc1, fc2) was adapted.
    adapted = [m["name"] for m in manifest.changed if "lora" in m["methods"]]
    assert len(adapted) == 6 * recovered.model.config.text_config.num_hidden_layers
    before = _caption_loss(pruned, shapes_test, shapes_root)
    after = _caption_loss(recovered, shapes_test, shapes_root)
    # Measured: 4.16 -> 3.90 nats on the held-out captions (an untrained adapter leaves it unchanged).
    assert after < before - 0.15, (before, after)
