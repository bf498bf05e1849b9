"""The export stage writes a quantized variant's packed folder, or says why there is none without failing."""

from __future__ import annotations

from vlmopt.models import load_model
from vlmopt.pipeline import compress_model, export_model


def test_a_packed_variant_is_exported_and_a_float_one_says_why(shapes_texts, tmp_path):
    source = load_model("tiny:blip", texts=shapes_texts, seed=0).save(tmp_path / "blip")
    packed = {"method": "uniform", "bits": 4, "part": "language", "granularity": "group", "group_size": 16}
    mixed = [{"method": "uniform", "bits": 8, "part": "vision"}, packed]
    compress_model(source, tmp_path / "w4", steps=[packed])
    compress_model(source, tmp_path / "mixed", steps=mixed)

    assert export_model(tmp_path / "w4", tmp_path / "out" / "w4") is True
    files = sorted(p.name for p in (tmp_path / "out" / "w4").iterdir())
    assert "model.safetensors" in files and "config.json" in files and "manifest.json" not in files

    (tmp_path / "out" / "mixed").mkdir(parents=True)
    (tmp_path / "out" / "mixed" / "stale.txt").write_text("from an earlier run")
    assert export_model(tmp_path / "mixed", tmp_path / "out" / "mixed") is False
    assert [p.name for p in (tmp_path / "out" / "mixed").iterdir()] == ["NOT_EXPORTED.txt"]
    assert "use 2 schemes" in (tmp_path / "out" / "mixed" / "NOT_EXPORTED.txt").read_text()
