"""Weight-only integer variants are stored packed in the compressed-tensors format: plain transformers
(with compressed-tensors, without vlmopt) loads them with the logits vlmopt computes, in a fraction of
the float bytes; what the format cannot hold keeps its float weights and the manifest says why."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from compressed_tensors import unpack_from_int32
from safetensors import safe_open

from vlmopt.compress import apply_variant
from vlmopt.compress.packed import GridRecord, pack_int32, pack_plan, record_grid, unpack_int32
from vlmopt.compress.saved import NotExportable, export_variant, load_variant, save_variant
from vlmopt.models import load_model

from .conftest import wide_blip2

GROUPED = {"granularity": "group", "group_size": 16}
CASES = {
    "rtn4-sym-g16": ("blip2-opt", {"method": "uniform", "bits": 4, "part": "language", "symmetric": True, **GROUPED}),
    "rtn4-asym-g16": ("blip2-opt", {"method": "uniform", "bits": 4, "part": "all", **GROUPED}),
    "rtn4-blip-g16": ("blip", {"method": "uniform", "bits": 4, "part": "all", "symmetric": True, **GROUPED}),
    "rtn8-channel": ("blip2-opt", {"method": "uniform", "bits": 8, "part": "all", "symmetric": True}),
    "rtn3-sym-g16": ("blip", {"method": "uniform", "bits": 3, "part": "language", "symmetric": True, **GROUPED}),
}
GPTQ_ACT_ORDER = {"method": "gptq", "bits": 4, "part": "language", "group_size": 16, "act_order": True}
AWQ = {"method": "awq", "bits": 4, "part": "language", "group_size": 16}

# A fresh process: plain transformers (and compressed-tensors, which it loads), never vlmopt.
PLAIN = r"""
import json, sys, torch, transformers
cases = json.loads(sys.argv[1])
out = {}
for name, (folder, cls, inputs) in cases.items():
    model = getattr(transformers, cls).from_pretrained(folder).eval()
    with torch.no_grad():
        out[name] = model(**torch.load(inputs)).logits
assert not any(m == "vlmopt" or m.startswith("vlmopt.") for m in sys.modules), "vlmopt was imported"
torch.save(out, sys.argv[2])
"""
CLASSES = {
    "blip2-opt": "Blip2ForConditionalGeneration",
    "blip2-wide": "Blip2ForConditionalGeneration",
    "blip": "BlipForConditionalGeneration",
}


def _inputs(loaded, shapes_test, shapes_root):
    from vlmopt.data.images import open_image

    images = [open_image(shapes_root, rel) for rel in shapes_test["image"][:2]]
    encoded = loaded.adapter.encode(loaded, images, ["a", "a"], ["two red circles", "one blue square"])
    return {k: v for k, v in encoded.inputs.items() if k != "labels"}


def _variant(family, steps, shapes_texts, folder, calibration=None):
    loaded = wide_blip2(shapes_texts) if family == "blip2-wide" else load_model(f"tiny:{family}", texts=shapes_texts)
    dense = {n: p.numel() for n, p in loaded.model.named_parameters()}
    manifest = apply_variant(loaded.model, loaded.parts(), steps, calibration=calibration)
    save_variant(loaded, folder, manifest, inputs_hash="test")
    return loaded, dense


def _packed_tensors(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_matches_compressed_tensors_own_unpacking(bits):
    generator = torch.Generator().manual_seed(bits)
    half = 2 ** (bits - 1)
    signed = torch.randint(-half, half, (7, 70), generator=generator)
    packed = pack_int32(signed + half, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, math.ceil(70 * bits / 32))
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size([7, 70])).to(torch.int64), signed)
    assert torch.equal(unpack_int32(packed, bits, 70), signed + half)
    # Zero points pack along the output dimension.
    column = torch.randint(-half, half, (70, 3), generator=generator)
    down = pack_int32((column + half).T, bits).T
    assert torch.equal(unpack_from_int32(down, bits, torch.Size([70, 3]), packed_dim=0).to(torch.int64), column)
    with pytest.raises(ValueError, match="must lie in"):
        pack_int32(signed, bits)  # signed values are not packed as they are


def test_packed_variants_load_in_plain_transformers_with_vlmopts_logits_in_bits_over_32_of_the_bytes(
    shapes_texts, shapes_train, shapes_test, shapes_root, blip2_calibration, tmp_path
):
    from vlmopt.compress.calibration import Calibration
    from vlmopt.tasks.encode import calibration_batches

    blip = load_model("tiny:blip", texts=shapes_texts)
    blip_calibration = Calibration(*calibration_batches(blip, shapes_train, shapes_root, n_samples=12, batch_size=4))
    cases = dict(CASES)
    cases["gptq4-act-order-static"] = ("blip2-opt", {**GPTQ_ACT_ORDER, "static_groups": True})
    cases["awq4-g16"] = ("blip2-opt", AWQ)
    cases["gptq4-act-order-blip-g16"] = ("blip", {**GPTQ_ACT_ORDER, "static_groups": True})
    cases["awq4-blip-g16"] = ("blip", AWQ)
    # Groups of 128 on a language model wide enough for them (hidden 128, feed-forward 256).
    cases["rtn4-g128"] = ("blip2-wide", {**CASES["rtn4-asym-g16"][1], "part": "language", "group_size": 128})
    cases["gptq4-act-order-g128"] = ("blip2-wide", {**GPTQ_ACT_ORDER, "static_groups": True, "group_size": 128})
    cases["awq4-g128"] = ("blip2-wide", {**AWQ, "group_size": 128})
    expected, plain_cases = {}, {}
    for name, (family, step) in cases.items():
        folder = tmp_path / name
        calibration = None
        if step["method"] in ("gptq", "awq"):
            calibration = blip_calibration if family == "blip" else blip2_calibration
        loaded, _ = _variant(family, [step], shapes_texts, folder, calibration)
        manifest = json.loads((folder / "manifest.json").read_text())
        storage = manifest["storage"]
        assert storage["format"] == "pack-quantized", (name, storage)
        assert storage["scheme"]["bits"] == step["bits"]
        config = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
        if step["method"] == "awq":
            # A group whose fold was refused stores Q(W * s) / s, on no grid, and stays float (most of
            # BLIP's post-norm BERT layers, whose query/key/value and feed-forward inputs follow no norm
            # or Linear to fold into), unless its searched scales are all 1 (Q(W), on its grid: the one
            # such group of tiny BLIP-2). A fold target's grid narrows by the scales it took.
            modules = manifest["steps"][0]["modules"]
            unfolded = {m["name"] for m in modules if m["scale_folded_into"] == "weight"}
            unit = {m["name"] for m in modules if m["name"] in unfolded and m["alpha"] == 0}
            kept = storage.pop("kept_float", {})
            assert set(kept) == unfolded - unit and all("no fold" in why for why in kept.values())
            assert storage["packed_modules"] + len(kept) == len(modules) and storage["packed_modules"] > 0
            assert family != "blip2-opt" or (len(modules) == 6 * 3 and storage["packed_modules"] == 18 and unit)
            taken = {m["name"] for m in modules if m.get("holds_scales_of") and m["scale_folded_into"] != "weight"}
            assert taken <= set(config["config_groups"]["group_0"]["targets"]) and (taken or family == "blip")
        assert "kept_float" not in storage

        # The quantized Linears' tensors: bits/32 of their float32 bytes, plus scales and zero points.
        tensors = _packed_tensors(folder)
        names = config["config_groups"]["group_0"]["targets"]
        assert len(names) == storage["packed_modules"] > 0
        for module in names:
            assert f"{module}.weight" not in tensors
            rows, columns = tensors[f"{module}.weight_shape"].tolist()
            packed = tensors[f"{module}.weight_packed"]
            assert packed.numel() * 4 <= rows * math.ceil(columns * step["bits"] / 32) * 4
            assert packed.numel() * 4 <= rows * columns * 4 * step["bits"] / 32 + rows * 4  # one padding word a row
            grouped = step.get("granularity", "group" if "group_size" in step else None)
            groups = columns // step["group_size"] if grouped else 1
            scale = tensors[f"{module}.weight_scale"]
            assert scale.numel() == rows * groups
            has_zero = f"{module}.weight_zero_point" in tensors
            assert has_zero == (not step.get("symmetric", False))

        inputs = _inputs(loaded, shapes_test, shapes_root)
        torch.save(inputs, tmp_path / f"{name}.pt")
        with torch.no_grad():
            expected[name] = load_variant(folder).model(**inputs).logits
            in_memory = loaded.model(**inputs).logits
        assert torch.equal(expected[name], in_memory)
        plain_cases[name] = (str(folder), CLASSES[family], str(tmp_path / f"{name}.pt"))
        if name == "rtn4-asym-g16":  # the exported folder too: without vlmopt's own files
            exported = export_variant(folder, tmp_path / "exported" / name)
            assert not (exported / "manifest.json").exists() and not (exported / "vlmopt.json").exists()
            assert (exported / "config.json").read_bytes() == (folder / "config.json").read_bytes()
            expected["exported"] = expected[name]
            plain_cases["exported"] = (str(exported), CLASSES[family], str(tmp_path / f"{name}.pt"))

    result = subprocess.run(
        [sys.executable, "-c", PLAIN, json.dumps(plain_cases), str(tmp_path / "plain.pt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    for name, logits in expected.items():
        relative = (plain[name] - logits).norm() / logits.norm()
        assert relative <= 1e-4, (name, float(relative))


def test_what_the_format_cannot_hold_keeps_float_weights_and_says_why(shapes_texts, blip2_calibration, tmp_path):
    # GPTQ act-order without static groups: each column's group follows the processing order.
    _variant("blip2-opt", [GPTQ_ACT_ORDER], shapes_texts, tmp_path / "act", blip2_calibration)
    storage = json.loads((tmp_path / "act" / "manifest.json").read_text())["storage"]
    assert storage["format"] == "float" and storage["kept_float"]
    assert all("act-order groups are not contiguous" in why for why in storage["kept_float"].values())
    assert "quantization_config" not in json.loads((tmp_path / "act" / "config.json").read_text())

    # Two schemes in one variant, one asymmetric (8 bits for the vision encoder, 4 for the language model).
    steps = [
        {"method": "uniform", "bits": 8, "part": "vision"},
        {"method": "uniform", "bits": 4, "part": "language", "symmetric": True, **GROUPED},
    ]
    _variant("blip2-opt", steps, shapes_texts, tmp_path / "mixed")
    storage = json.loads((tmp_path / "mixed" / "manifest.json").read_text())["storage"]
    assert storage["format"] == "float" and "use 2 schemes" in storage["reason"] and "asymmetric" in storage["reason"]
    loaded = load_variant(tmp_path / "mixed")
    assert loaded.model.language_model.model.decoder.layers[0].fc1.weight.dtype == torch.float32

    # Not quantized at all: float, no reason needed.
    pruned = [{"method": "prune_layers", "part": "language", "drop_last": 1}]
    _variant("blip2-opt", pruned, shapes_texts, tmp_path / "p")
    assert json.loads((tmp_path / "p" / "manifest.json").read_text())["storage"]["format"] == "float"

    # Packed, but with input quantizers that plain transformers would not attach.
    w4a8 = {**CASES["rtn4-sym-g16"][1], "activation_bits": 8}
    _variant("blip2-opt", [w4a8], shapes_texts, tmp_path / "w4a8")
    assert json.loads((tmp_path / "w4a8" / "manifest.json").read_text())["storage"]["format"] == "pack-quantized"

    # None of them exports, each with its reason; the command line says the same and writes nothing.
    reasons = {
        "act": "no quantized module can be stored packed (e.g. language_model.model.decoder.layers.0.",
        "mixed": "is not stored as packed low-bit weights: its quantized modules use 2 schemes",  # one asymmetric
        "p": "is not stored as packed low-bit weights: no module was quantized",
        "w4a8": "its uniform step(s) leave what plain transformers cannot rebuild",
    }
    for name, reason in reasons.items():
        with pytest.raises(NotExportable, match=re.escape(reason)):
            export_variant(tmp_path / name, tmp_path / "out" / name)
    result = subprocess.run(
        [sys.executable, "-m", "vlmopt.cli", "export", str(tmp_path / "act"), "--out", str(tmp_path / "out" / "act")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1 and "vlmopt export: " in result.stderr and "act-order groups" in result.stderr
    assert not (tmp_path / "out").exists()


# Plain transformers keeps a folder of several schemes compressed and decompresses it on the first
# forward pass; generate() first needs the decompression called by hand.
PLAIN_MIXED = r"""
import sys, torch, transformers
folder, inputs_file, out = sys.argv[1:]
inputs = torch.load(inputs_file)
model = transformers.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
with torch.no_grad():
    logits = model(**inputs).logits
again = transformers.Blip2ForConditionalGeneration.from_pretrained(folder).eval()
again.hf_quantizer.compressor.decompress_model(again)
tokens = again.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
assert not any(m == "vlmopt" or m.startswith("vlmopt.") for m in sys.modules), "vlmopt was imported"
torch.save({"logits": logits, "tokens": tokens}, out)
"""


def test_symmetric_schemes_of_several_bit_widths_are_packed_in_one_group_each(
    shapes_texts, shapes_test, shapes_root, blip2_calibration, tmp_path
):
    # The seed's GPTQ grid: other bits per part, symmetric, per channel; and a grouped round-to-nearest part.
    steps = [
        {"method": "gptq", "bits": 8, "part": "vision", "symmetric": True},
        {"method": "gptq", "bits": 3, "part": "bridge", "symmetric": True},
        {"method": "uniform", "bits": 4, "part": "language", "symmetric": True, **GROUPED},
    ]
    folder = tmp_path / "mixed"
    loaded, _ = _variant("blip2-opt", steps, shapes_texts, folder, blip2_calibration)
    storage = json.loads((folder / "manifest.json").read_text())["storage"]
    assert storage["format"] == "pack-quantized" and "kept_float" not in storage
    assert [(s["bits"], s["strategy"]) for s in storage["schemes"]] == [(4, "group"), (3, "channel"), (8, "channel")]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert "dequantize" not in config and len(config["config_groups"]) == 3
    tensors = _packed_tensors(folder)
    for group in config["config_groups"].values():
        bits = group["weights"]["num_bits"]
        for module in group["targets"]:
            rows, columns = tensors[f"{module}.weight_shape"].tolist()
            assert tensors[f"{module}.weight_packed"].shape == (rows, math.ceil(columns * bits / 32))
    assert sum(len(g["targets"]) for g in config["config_groups"].values()) == storage["packed_modules"]

    # vlmopt decompresses as it loads: the evaluated model, parameter for parameter.
    reloaded = load_variant(folder)
    state, expected_state = reloaded.model.state_dict(), loaded.model.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[k], expected_state[k]) for k in state)
    assert not any(hasattr(m, "quantization_scheme") for m in reloaded.model.modules())

    inputs = _inputs(loaded, shapes_test, shapes_root)
    torch.save(inputs, tmp_path / "inputs.pt")
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
        tokens = loaded.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_MIXED, str(folder), str(tmp_path / "inputs.pt"), str(tmp_path / "plain.pt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    plain = torch.load(tmp_path / "plain.pt")
    assert float((plain["logits"] - logits).norm() / logits.norm()) <= 1e-4
    assert torch.equal(plain["tokens"], tokens)
    # The exported folder is the same files.
    exported = export_variant(folder, tmp_path / "exported")
    assert (exported / "config.json").read_bytes() == (folder / "config.json").read_bytes()


def test_a_weight_moved_off_its_grid_or_tied_is_not_packed(shapes_texts):
    loaded = load_model("tiny:blip2-opt", texts=shapes_texts, seed=0)
    apply_variant(loaded.model, loaded.parts(), [CASES["rtn4-sym-g16"][1]])
    fc1 = "language_model.model.decoder.layers.0.fc1"
    assert fc1 in pack_plan(loaded.model).packed
    with torch.no_grad():
        loaded.model.get_submodule(fc1).weight[0, 0] += 1e-3  # a later step moved one element
    plan = pack_plan(loaded.model)
    assert fc1 not in plan.packed and "1 of" in plan.kept[fc1] and "not on its recorded grid" in plan.kept[fc1]
    assert len(plan.packed) == 17  # the other language Linears still pack

    head = loaded.model.language_model.lm_head
    record_grid(head, GridRecord(4, True, "channel", None, torch.ones(head.weight.shape[0], 1), torch.zeros(1, 1)))
    assert "shared with another module" in pack_plan(loaded.model).kept["language_model.lm_head"]
