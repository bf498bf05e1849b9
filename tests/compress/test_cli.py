"""``vlmopt compress --model DIR --steps steps.yaml --out DIR`` writes the variant and its manifest."""

from __future__ import annotations

import json

import pytest

from vlmopt.cli import main
from vlmopt.models import load_model


def test_compress_from_a_steps_file(shapes_texts, tmp_path):
    load_model("tiny:blip", texts=shapes_texts, seed=0).save(tmp_path / "model")
    (tmp_path / "steps.yaml").write_text("- {method: uniform, bits: 4, part: language, role: attention}\n")
    assert (
        main(
            [
                "compress",
                "--model",
                str(tmp_path / "model"),
                "--steps",
                str(tmp_path / "steps.yaml"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["n_changed_modules"] > 0
    assert all(m["role"] == "attention" and m["part"] == "language" for m in manifest["changed_modules"])


def test_steps_must_be_a_list_of_mappings(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--model", str(tmp_path), "--steps", "{method: uniform}", "--out", str(tmp_path / "o")])
    assert "steps must be a list of mappings" in capsys.readouterr().err
