"""A toy vision-language model whose module names mirror BLIP-2 (ViT, BERT-style Q-Former, OPT).

Six layers per part, so each third (first/middle/last) holds two layers. Widths differ per part
(vision 32, bridge 24, language 40) so parameter fractions are distinct per part.

Also the tiny BLIP-2 OPT and BLIP models with their calibration data, which the GPTQ, AWQ and
calibration tests share, and :func:`logit_error`, how far a variant's logits move.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from vlmopt.compress import apply_variant
from vlmopt.compress.calibration import Calibration
from vlmopt.models import load_model
from vlmopt.models.base import LoadedModel
from vlmopt.tasks.encode import calibration_batches

DV, DB, DL = 32, 24, 40
PATCH_DIM, N_PATCHES, N_QUERIES, VOCAB = 12, 5, 4, 50
N_LAYERS = 6


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return weights @ v


class ViTAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.projection = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.projection(attend(q, k, v))


class ViTMLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class ViTLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = ViTAttention(d)
        self.layer_norm1 = nn.LayerNorm(d)
        self.mlp = ViTMLP(d)
        self.layer_norm2 = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ViTEmbeddings(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.patch_embedding = nn.Linear(PATCH_DIM, d)


class ViTEncoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ViTLayer(d) for _ in range(N_LAYERS))


class VisionModel(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.embeddings = ViTEmbeddings(d)
        self.encoder = ViTEncoder(d)
        self.post_layernorm = nn.LayerNorm(d)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.patch_embedding(patches)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, d: int, d_kv: int) -> None:
        super().__init__()
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d_kv, d)
        self.value = nn.Linear(d_kv, d)


class BertSelfOutput(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d)


class BertAttention(nn.Module):
    def __init__(self, d: int, d_kv: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(d, d_kv)
        self.output = BertSelfOutput(d)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        s = self.self
        h = attend(s.query(x), s.key(context), s.value(context))
        return self.output.LayerNorm(x + self.output.dense(h))


class BertDense(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class QFormerLayer(nn.Module):
    def __init__(self, d: int, d_vision: int) -> None:
        super().__init__()
        self.attention = BertAttention(d, d)
        self.crossattention = BertAttention(d, d_vision)
        self.intermediate = BertDense(d, 2 * d)
        self.output = BertDense(2 * d, d)
        self.intermediate_query = BertDense(d, 2 * d)
        self.output_query = BertDense(2 * d, d)

    def forward(self, q: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        q = self.attention(q, q)
        q = self.crossattention(q, image)
        text_path = self.output.dense(torch.relu(self.intermediate.dense(q)))
        query_path = self.output_query.dense(torch.relu(self.intermediate_query.dense(q)))
        return q + query_path + 0.5 * text_path


class QFormerEncoder(nn.Module):
    def __init__(self, d: int, d_vision: int) -> None:
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(d, d_vision) for _ in range(N_LAYERS))


class QFormer(nn.Module):
    def __init__(self, d: int, d_vision: int) -> None:
        super().__init__()
        self.layernorm = nn.LayerNorm(d)
        self.encoder = QFormerEncoder(d, d_vision)


class OPTAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x)))


class OPTLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.self_attn = OPTAttention(d)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(torch.relu(self.fc1(self.final_layer_norm(x))))


class OPTDecoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, d)
        self.layers = nn.ModuleList(OPTLayer(d) for _ in range(N_LAYERS))


class OPTModel(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.decoder = OPTDecoder(d)


class OPTForCausalLM(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.model = OPTModel(d)
        self.lm_head = nn.Linear(d, VOCAB, bias=False)


class ToyBlip2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.vision_model = VisionModel(DV)
        self.query_tokens = nn.Parameter(torch.randn(1, N_QUERIES, DB) * 0.5)
        self.qformer = QFormer(DB, DV)
        self.language_projection = nn.Linear(DB, DL)
        self.language_model = OPTForCausalLM(DL)

    def forward(self, patches: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        image = self.vision_model(patches)
        q = self.qformer.layernorm(self.query_tokens.expand(patches.shape[0], -1, -1))
        for layer in self.qformer.encoder.layer:
            q = layer(q, image)
        x = torch.cat([self.language_projection(q), self.language_model.model.decoder.embed_tokens(input_ids)], 1)
        for layer in self.language_model.model.decoder.layers:
            x = layer(x)
        return self.language_model.lm_head(x)


def toy_parts(model: ToyBlip2) -> dict[str, list[tuple[str, nn.Module]]]:
    return {
        "vision": [(f"vision_model.encoder.layers.{i}", m) for i, m in enumerate(model.vision_model.encoder.layers)],
        "bridge": [(f"qformer.encoder.layer.{i}", m) for i, m in enumerate(model.qformer.encoder.layer)],
        "language": [
            (f"language_model.model.decoder.layers.{i}", m)
            for i, m in enumerate(model.language_model.model.decoder.layers)
        ],
    }


def make_toy(seed: int = 0) -> tuple[ToyBlip2, dict[str, list[tuple[str, nn.Module]]]]:
    torch.manual_seed(seed)
    model = ToyBlip2().eval()
    return model, toy_parts(model)


def toy_inputs(seed: int = 1, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(batch, N_PATCHES, PATCH_DIM, generator=g)
    input_ids = torch.randint(0, VOCAB, (batch, 6), generator=g)
    return patches, input_ids


@pytest.fixture
def toy() -> tuple[ToyBlip2, dict[str, list[tuple[str, nn.Module]]]]:
    return make_toy()


@pytest.fixture
def toy_factory() -> Callable[[int], tuple[ToyBlip2, dict[str, list[tuple[str, nn.Module]]]]]:
    return make_toy


@pytest.fixture
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return toy_inputs()


@pytest.fixture(scope="module", params=["blip2-opt", "blip"])
def tiny(request, shapes_texts):
    """The tiny BLIP-2 OPT and BLIP models, for GPTQ and AWQ on whole models."""
    return load_model(f"tiny:{request.param}", texts=shapes_texts, seed=0)


@pytest.fixture(scope="module")
def data(tiny, shapes_train, shapes_test, shapes_root):
    """Calibration batches of ``tiny`` from the train split, and held-out batches from the test split."""
    calibration = Calibration(*calibration_batches(tiny, shapes_train, shapes_root, n_samples=32, batch_size=8))
    held_out = Calibration(*calibration_batches(tiny, shapes_test, shapes_root, n_samples=16, batch_size=8, seed=5))
    return calibration, held_out


def logit_error(loaded, steps, calibration, held_out) -> tuple[float, dict]:
    """Mean squared logit error on held-out samples after ``steps``; restores the model afterwards."""
    model = loaded.model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = [model(**b).logits for b in held_out.batches]
    try:
        manifest = apply_variant(model, loaded.parts(), steps, calibration=calibration)
        with torch.no_grad():
            out = [model(**b).logits for b in held_out.batches]
    finally:
        model.load_state_dict(original)
    error = sum(float((o - r).pow(2).mean()) for o, r in zip(out, reference, strict=True)) / len(out)
    return error, manifest


def put_on_grid(loaded, steps, *, step: float = 0.1, seed: int = 0) -> None:
    """Set the weights ``steps`` select to a 3-bit per-channel grid whose step is not a power of two.

    Every row holds integer levels -3..4 times ``step``, both ends included, so 3-bit min-max
    rounding per channel reproduces it up to float rounding (``step`` is not exact in binary).
    """
    from vlmopt.compress.select import select_modules

    settings = {k: v for k, v in steps[0].items() if k in ("part", "position", "role")}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ref in select_modules(loaded.model, loaded.parts(), **settings):
            w = ref.module.weight
            levels = torch.randint(-3, 5, w.shape, generator=g).to(w.dtype)
            levels[:, 0], levels[:, 1] = -3.0, 4.0
            w.copy_(levels * step)


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory, shapes_texts):
    """The tiny BLIP-2 OPT saved to a folder, as the pipeline's stages read models."""
    folder = tmp_path_factory.mktemp("blip2")
    load_model("tiny:blip2-opt", texts=shapes_texts, seed=0).save(folder)
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, shapes_root):
    """A data root holding the shapes dataset, where calibration and training splits are found."""
    root = tmp_path_factory.mktemp("data")
    (root / "shapes").symlink_to(shapes_root, target_is_directory=True)
    return root


def wide_blip2(texts: list[str], seed: int = 0) -> LoadedModel:
    """The tiny BLIP-2 OPT with a language model wide enough for groups of 128 and the int4 kernels'
    shapes (hidden 128, feed-forward 256), its tokenizer and processor unchanged."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    loaded = load_model("tiny:blip2-opt", texts=texts, seed=seed)
    config = loaded.model.config.to_dict()
    config["text_config"].update(hidden_size=128, ffn_dim=256, word_embed_proj_dim=128)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(Blip2Config(**config))
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    return LoadedModel(model.eval(), loaded.processor, loaded.family, loaded.adapter, source=loaded.source)
