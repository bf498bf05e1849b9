"""Roofline measures (vlmopt.profiling.roofline): the weight bytes a decode step reads, counted
independently from the model's parts, and the peaks a device is compared with."""

from __future__ import annotations

import torch

from vlmopt.profiling import roofline
from vlmopt.profiling.roofline import decode_weight_bytes, device_peaks


def _generate(loaded, images, prompts):
    encoded = loaded.adapter.encode(loaded, images, prompts)
    return lambda n: loaded.adapter.generate(loaded, encoded, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def _images(shapes_test, shapes_root, n):
    from vlmopt.data.images import open_image

    return [open_image(shapes_root, rel) for rel in shapes_test["image"][:n]], ["a"] * n


def test_a_decode_step_reads_the_language_model_once_and_one_embedding_row_per_sample(
    blip2_opt, shapes_test, shapes_root
):
    batch = 2
    read = decode_weight_bytes(blip2_opt.model, _generate(blip2_opt, *_images(shapes_test, shapes_root, batch)), 4)
    lm = blip2_opt.model.language_model
    decoder = lm.model.decoder
    embeddings = {"model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight"}
    body = sum(p.numel() * 4 for name, p in lm.named_parameters() if name not in embeddings)
    head = lm.lm_head.weight.numel() * 4  # tied to the token embedding, read whole by the output layer
    rows = batch * (decoder.embed_tokens.embedding_dim + decoder.embed_positions.embedding_dim) * 4
    assert read == body + head + rows
    # The vision encoder and the Q-Former run in the prefill only.
    vision = sum(p.numel() * 4 for p in blip2_opt.model.vision_model.parameters())
    assert read < sum(p.numel() * 4 for p in blip2_opt.model.parameters()) - vision
    assert decode_weight_bytes(blip2_opt.model, lambda n: None, 1) is None


def test_a_packed_variant_on_a_kernel_reads_its_integers_not_floats(shapes_texts, shapes_test, shapes_root, tmp_path):
    from tests.compress.conftest import wide_blip2
    from vlmopt.compress import apply_variant
    from vlmopt.compress.kernels import use_kernels
    from vlmopt.compress.saved import load_variant, save_variant

    step = {"method": "uniform", "bits": 4, "part": "language", "granularity": "group", "group_size": 128}
    loaded = wide_blip2(shapes_texts)
    save_variant(loaded, tmp_path, apply_variant(loaded.model, loaded.parts(), [step]), inputs_hash="test")
    dense, fast = load_variant(tmp_path), load_variant(tmp_path)
    use = use_kernels(fast.model, tmp_path)
    images = _images(shapes_test, shapes_root, 1)
    dense_read = decode_weight_bytes(dense.model, _generate(dense, *images), 3)
    fast_read = decode_weight_bytes(fast.model, _generate(fast, *images), 3)
    saved = 0
    for name in use.replaced:
        floats = dense.model.get_submodule(name).weight
        kernel = fast.model.get_submodule(name)
        integers = sum(b.numel() * b.element_size() for b in kernel.buffers() if b is not kernel.bias)
        saved += floats.numel() * 4 - integers
    assert saved > 0 and dense_read - fast_read == saved


def test_known_gpus_use_vendor_figures_and_others_are_measured(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    peaks = device_peaks(torch.device("cuda:0"))
    assert (peaks.bandwidth_gb_s, peaks.tflops) == (4800.0, 989.0) and "NVIDIA H200" in peaks.source
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert device_peaks(torch.device("cuda:0")).bandwidth_gb_s == 2000.0
    cpu = device_peaks(torch.device("cpu"))
    assert cpu.bandwidth_gb_s > 0 and cpu.tflops > 0 and cpu.source.startswith("measured on this cpu")
    assert roofline._measured.cache_info().currsize >= 1
