"""Device choice and placement (vlmopt.device): which device a stage picks, what stays on the CPU,
and that inference hands the model its inputs on the model's own device.

This machine has no GPU: CUDA's presence is simulated where only the choice is tested, and the
``meta`` device stands in for "a device other than the CPU" where tensors must really move.
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

from vlmopt import device as dev
from vlmopt.infer import predict
from vlmopt.models import load_model


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.delenv(dev.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch says a GPU is there (nothing may actually be moved to it)."""
    monkeypatch.delenv(dev.ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_auto_is_the_cpu_without_cuda_and_cuda_with_it(no_cuda, monkeypatch):
    assert dev.resolve_device() == torch.device("cpu")
    assert dev.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device() == torch.device("cuda")


def test_environment_names_the_device_and_an_argument_overrides_it(fake_cuda, monkeypatch):
    monkeypatch.setenv(dev.ENV, "cpu")
    assert dev.resolve_device() == torch.device("cpu")  # a GPU is there, but the environment says cpu
    assert dev.resolve_device("cuda:0") == torch.device("cuda", 0)


def test_cuda_without_a_gpu_is_an_error_not_a_silent_cpu_run(no_cuda, monkeypatch):
    with pytest.raises(RuntimeError, match="'cuda' was asked for but torch sees no CUDA GPU"):
        dev.resolve_device("cuda")
    monkeypatch.setenv(dev.ENV, "cuda:1")
    with pytest.raises(RuntimeError, match="'cuda:1' was asked for"):
        dev.resolve_device()


def test_a_missing_gpu_index_and_unknown_devices_are_named(fake_cuda):
    with pytest.raises(RuntimeError, match=r"'cuda:3' does not exist: 1 CUDA GPU\(s\) visible"):
        dev.resolve_device("cuda:3")
    with pytest.raises(ValueError, match="'gpu0' is not one of auto, cpu, cuda, cuda:N"):
        dev.resolve_device("gpu0")
    with pytest.raises(ValueError, match="'meta': only auto, cpu, cuda and cuda:N"):
        dev.resolve_device("meta")


def _fbgemm_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def test_cpu_only_models_and_variants_stay_on_the_cpu(fake_cuda, tmp_path, monkeypatch):
    plain = nn.Linear(4, 4)
    assert dev.cpu_only_reason(plain) is None
    assert dev.cpu_only_reason(_fbgemm_model()) == "module '0' is a Linear of torch.ao (CPU kernels only)"
    (tmp_path / "manifest.json").write_text(json.dumps({"runtime_steps": [{"method": "dynamic_int8"}]}))
    assert dev.variant_cpu_reason(tmp_path) == "the variant has runtime steps ['dynamic_int8'], which run on the CPU"
    assert dev.cpu_only_reason(plain, tmp_path) == dev.variant_cpu_reason(tmp_path)

    quantized = _fbgemm_model()
    moved = []
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    # CUDA "is there", but neither model may go to it: no move is even attempted.
    assert dev.place(quantized) == torch.device("cpu")
    assert dev.place(plain, "auto", model_dir=tmp_path) == torch.device("cpu")
    assert moved == []
    # A plain model is moved to the GPU.
    assert dev.place(plain, "auto") == torch.device("cuda")
    assert moved == [(torch.device("cuda"),)]


def test_place_moves_the_model_and_to_model_device_its_inputs():
    model = nn.Linear(4, 2)
    assert dev.model_device(model) == torch.device("cpu")
    assert dev.place(model, "cpu") == torch.device("cpu")
    model.to("meta")
    inputs = {"input_ids": torch.ones(2, 3, dtype=torch.long), "pixel_values": torch.zeros(2, 4), "flag": True}
    moved = dev.to_model_device(inputs, model)
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].dtype == torch.long
    assert moved["pixel_values"].device.type == "meta" and moved["flag"] is True
    assert inputs["input_ids"].device.type == "cpu"  # the caller's dict is not changed
    assert dev.model_device(nn.ReLU()) == torch.device("cpu")  # no parameters, no buffers


def test_generation_gets_its_inputs_on_the_models_device(shapes_texts, shapes_test, shapes_root):
    """The generation loop moves each encoded batch to the model's device (meta here, standing in for a GPU)."""
    loaded = load_model("tiny:blip", texts=shapes_texts, seed=0)
    seen: list[set[str]] = []

    class Recording(type(loaded.adapter)):
        def generate(self, loaded, encoded, **kwargs):
            seen.append({t.device.type for t in encoded.inputs.values() if isinstance(t, torch.Tensor)})
            return ["a shape"] * len(encoded.inputs["input_ids"])

    loaded = dataclasses.replace(loaded, adapter=Recording())
    loaded.model.to("meta")
    out = predict(loaded, shapes_test.head(6), shapes_root, "captioning", batch_size=4, generate_kwargs={})
    assert list(out["prediction"]) == ["a shape"] * 6
    assert seen and all(types == {"meta"} for types in seen), seen
