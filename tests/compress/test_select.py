from __future__ import annotations

import pytest

from vlmopt.compress.select import (
    NothingSelectedError,
    attention_kind_of,
    position_of,
    position_range,
    role_of,
    select_modules,
)

V = "vision_model.encoder.layers"
B = "qformer.encoder.layer"
L = "language_model.model.decoder.layers"


@pytest.mark.parametrize(
    ("local", "role", "kind"),
    [
        ("self_attn.qkv", "attention", "self"),
        ("self_attn.projection", "attention", "self"),
        ("attention.self.query", "attention", "self"),
        ("attention.output.dense", "attention", "self"),
        ("crossattention.self.key", "attention", "cross"),
        ("crossattention.output.dense", "attention", "cross"),
        ("self_attn.q_proj", "attention", "self"),
        ("self_attn.out_proj", "attention", "self"),
        ("encoder_attn.k_proj", "attention", "cross"),
        ("cross_attn.q_proj", "attention", "cross"),
        ("attn.qkv", "attention", "self"),
        ("layer.0.SelfAttention.q", "attention", "self"),
        ("layer.1.EncDecAttention.k", "attention", "cross"),
        ("mlp.fc1", "mlp", None),
        ("fc2", "mlp", None),
        ("intermediate.dense", "mlp", None),
        ("output.dense", "mlp", None),
        ("intermediate_query.dense", "mlp", None),
        ("output_query.dense", "mlp", None),
        ("mlp.gate_proj", "mlp", None),
        # "attn" inside a longer word is not an attention block
        ("attnless_mlp.fc1", "mlp", None),
    ],
)
def test_role_and_attention_kind(local: str, role: str, kind: str | None) -> None:
    assert role_of(local) == role
    assert attention_kind_of(local) == kind


def test_thirds_match_the_grid_study() -> None:
    assert [list(position_range(p, 6)) for p in ("first", "middle", "last")] == [[0, 1], [2, 3], [4, 5]]
    # OPT-2.7b has 32 decoder layers: 10 / 11 / 11
    assert [len(position_range(p, 32)) for p in ("first", "middle", "last")] == [10, 11, 11]
    assert [position_of(i, 32) for i in (9, 10, 20, 21, 31)] == ["first", "middle", "middle", "last", "last"]
    assert list(position_range("first", 2)) == [] and list(position_range("last", 2)) == [1]
    assert list(position_range("all", 7)) == list(range(7))


def _names(model, parts, **kw) -> list[str]:
    return [ref.name for ref in select_modules(model, parts, **kw)]


def test_vision_first_attention(toy) -> None:
    model, parts = toy
    assert _names(model, parts, part="vision", position="first", role="attention") == [
        f"{V}.0.self_attn.qkv",
        f"{V}.0.self_attn.projection",
        f"{V}.1.self_attn.qkv",
        f"{V}.1.self_attn.projection",
    ]


def test_opt_attention_finds_q_k_v_out_proj(toy) -> None:
    """Regression: 'LLM attention' once looked for a fused qkv and matched nothing on OPT."""
    model, parts = toy
    names = _names(model, parts, part="language", role="attention")
    assert names == [f"{L}.{i}.self_attn.{p}" for i in range(6) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def test_language_middle_mlp(toy) -> None:
    model, parts = toy
    refs = select_modules(model, parts, part="language", position="middle", role="mlp")
    assert [r.name for r in refs] == [f"{L}.2.fc1", f"{L}.2.fc2", f"{L}.3.fc1", f"{L}.3.fc2"]
    assert {(r.part, r.position, r.role, r.attention_kind) for r in refs} == {("language", "middle", "mlp", None)}
    assert [r.layer_index for r in refs] == [2, 2, 3, 3]


def test_bridge_mlp_includes_query_branches(toy) -> None:
    model, parts = toy
    names = _names(model, parts, part="bridge", position="last", role="mlp")
    mlp = ("intermediate.dense", "output.dense", "intermediate_query.dense", "output_query.dense")
    assert names == [f"{B}.{i}.{m}" for i in (4, 5) for m in mlp]


def test_bridge_attention_kinds(toy) -> None:
    model, parts = toy
    refs = select_modules(model, parts, part="bridge", position="first", role="attention")
    assert len(refs) == 16
    kinds = {r.name.split(".", 4)[-1]: r.attention_kind for r in refs if r.layer_index == 0}
    assert kinds == {
        "attention.self.query": "self",
        "attention.self.key": "self",
        "attention.self.value": "self",
        "attention.output.dense": "self",
        "crossattention.self.query": "cross",
        "crossattention.self.key": "cross",
        "crossattention.self.value": "cross",
        "crossattention.output.dense": "cross",
    }


def test_all_parts_skip_modules_outside_layers(toy) -> None:
    model, parts = toy
    refs = select_modules(model, parts, part="all")
    assert len(refs) == 6 * 4 + 6 * 12 + 6 * 6
    names = {r.name for r in refs}
    for outside in (
        "vision_model.embeddings.patch_embedding",
        "language_projection",
        "language_model.lm_head",
    ):
        assert outside not in names
    assert [r.part for r in refs] == ["vision"] * 24 + ["bridge"] * 72 + ["language"] * 36


def test_explicit_modules_are_added(toy) -> None:
    model, parts = toy
    refs = select_modules(
        model,
        parts,
        part="language",
        position="last",
        role="mlp",
        modules=["language_projection", r"re:.*lm_head"],
    )
    assert [r.name for r in refs[-2:]] == ["language_projection", "language_model.lm_head"]
    extra = refs[-1]
    assert (extra.part, extra.layer_index, extra.position) == ("other", None, None)
    # naming a module already selected does not duplicate it; one inside a layer keeps its place
    refs = select_modules(model, parts, part="language", position="last", modules=[f"{V}.0.mlp.fc1", f"{L}.5.fc1"])
    names = [r.name for r in refs]
    assert len(names) == len(set(names)) == 13
    assert (refs[-1].part, refs[-1].layer_index, refs[-1].position, refs[-1].role) == (
        "vision",
        0,
        "first",
        "mlp",
    )


def test_explicit_module_matching_nothing_is_an_error(toy) -> None:
    model, parts = toy
    with pytest.raises(NothingSelectedError, match="lm_haed"):
        select_modules(model, parts, part="language", modules=["language_model.lm_haed"])


def test_absent_part_names_the_setting(toy) -> None:
    model, parts = toy
    blip_like = {"vision": parts["vision"], "language": parts["language"]}
    with pytest.raises(NothingSelectedError) as err:
        select_modules(model, blip_like, part="bridge", role="attention")
    message = str(err.value)
    assert "part='bridge'" in message and "role='attention'" in message
    assert "bridge: absent" in message and "vision: 6 layers" in message


def test_empty_third_names_the_setting(toy) -> None:
    model, parts = toy
    short = {"language": parts["language"][:2]}
    with pytest.raises(NothingSelectedError) as err:
        select_modules(model, short, part="language", position="first")
    message = str(err.value)
    assert "position='first'" in message
    assert "language: 2 layers (first 0, middle 1, last 1)" in message
    assert isinstance(err.value, ValueError)


def test_bad_values_list_the_choices(toy) -> None:
    model, parts = toy
    with pytest.raises(ValueError, match="part='llm'.*vision, bridge, language, all"):
        select_modules(model, parts, part="llm")
    with pytest.raises(ValueError, match="role='ffn'.*attention, mlp, both"):
        select_modules(model, parts, part="all", role="ffn")


def test_parts_must_point_into_the_model(toy) -> None:
    model, parts = toy
    wrong = {"vision": [("vision_model.encoder.layers.0", parts["vision"][1][1])]}
    with pytest.raises(ValueError, match="holds another module"):
        select_modules(model, wrong, part="vision")
    with pytest.raises(ValueError, match="unknown part 'text'"):
        select_modules(model, {"text": parts["language"]}, part="all")
