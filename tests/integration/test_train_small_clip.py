"""The small-CLIP training script stays honest: a much smaller model learns for a few steps and exports by the standard path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipsearch.model_files import ModelFiles
from clipsearch_tools import demo_images

pytestmark = pytest.mark.integration


def test_a_few_training_steps_lower_the_loss_and_the_checkpoint_exports(tmp_path: Path):
    from model_export.__main__ import main as export_main
    from model_export.train_small_clip import main as train_main

    checkpoint = tmp_path / "checkpoint"
    assert train_main(["--out", str(checkpoint), "--seed", "0", "--steps", "80", "--batch-size", "32",
                       "--pool-images", "64", "--learning-rate", "0.003", "--warmup-steps", "5",
                       "--image-size", "32", "--text-width", "16", "--vision-width", "16", "--layers", "1",
                       "--heads", "2", "--projection-dim", "16", "--eval-images", "48"]) == 0
    record = json.loads((checkpoint / "training.json").read_text())
    assert record["final_loss"] < record["first_loss"] * 0.9, record
    assert {"model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in checkpoint.iterdir()}

    photos = tmp_path / "photos"
    demo_images.write_dataset(photos, 6, seed=3)
    exported = tmp_path / "exported"
    assert export_main(["--model", str(checkpoint), "--out", str(exported), "--sample-photos", str(photos)]) == 0
    files = ModelFiles.open(exported)
    assert files.embedding_dim == 16
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["parity"]["onnx_vs_torch"]["image"]["min_cosine"] > 0.9999
