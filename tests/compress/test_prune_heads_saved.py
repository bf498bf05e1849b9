"""Reading back a head-pruned folder: the recorded modules are shrunk and loaded, anything else is refused."""

from __future__ import annotations

import copy
import json

import pytest

from tests.compress.test_prune_heads import OPT_LAYERS, n_params
from vlmopt.compress import apply_variant, load_head_pruned, restore_pruned_heads
from vlmopt.models import load_model


def test_restore_needs_the_recorded_modules(tmp_path) -> None:
    loaded = load_model("tiny:blip2-opt")
    manifest = apply_variant(
        loaded.model, loaded.parts(), [{"method": "prune_heads", "part": "language", "position": "last", "heads": 1}]
    )
    folder = loaded.save(tmp_path / "pruned")
    manifest = json.loads(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        load_model(folder)  # why load_head_pruned exists
    fresh = load_head_pruned(folder)
    assert fresh.model.get_submodule(f"{OPT_LAYERS}.2.self_attn.q_proj").out_features == 48
    names = restore_pruned_heads(fresh.model, manifest, folder)
    assert names == [m["name"] for m in manifest["steps"][0]["modules"]]
    assert fresh.model.get_submodule(f"{OPT_LAYERS}.2.self_attn.q_proj").out_features == 24
    assert n_params(fresh.model) == n_params(loaded.model)
    assert restore_pruned_heads(fresh.model, {"steps": []}, folder) == []

    again = load_head_pruned(folder)
    renamed = copy.deepcopy(manifest)
    for module in renamed["steps"][0]["modules"]:
        module["name"] = module["name"].replace(".2.", ".7.")
        module["block"] = module["block"].replace(".2.", ".7.")
    with pytest.raises(ValueError, match=r"layers\.7\.self_attn\.\w+, which the loaded model does not have"):
        restore_pruned_heads(again.model, renamed, folder)
    # A folder whose tensors are full size does not match the pruned shapes the manifest records.
    dense = load_model("tiny:blip2-opt").save(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"holds language_model\.model\.decoder\.layers\.2\.self_attn\.\w+_proj"):
        restore_pruned_heads(load_model(dense).model, manifest, dense)
