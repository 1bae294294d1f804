"""Search means something: the shipped small shapes CLIP, exported by the standard path, retrieves by meaning.

Held-out colour/shape pairs (never drawn in training) are asked for by text through the local stack;
image queries must find their class (`clipsearch evaluate`); int8 and fp32 towers must agree on rankings.
Thresholds sit well below what was measured (see each constant).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clipsearch.encoders import OnnxImageEncoder, OnnxTextEncoder
from clipsearch.model_files import ModelFiles
from clipsearch.ports import ImageInput

from clipsearch_tools import demo_images
from clipsearch_tools.cli.evaluate import label_of
from clipsearch_tools.local.models import SMALL_CLIP_CHECKPOINT, SMALL_CLIP_QUANTIZATION

pytestmark = pytest.mark.e2e

CLIPSEARCH = Path(sys.executable).parent / "clipsearch"
DATASET = "shapes"
DEMO_IMAGES = 288  # six of each of the 48 colour/shape pairs
# Measured on the shipped checkpoint, required with margin; chance is 6/288 = 0.02 for any of them.
MIN_HELD_OUT_TEXT_P_AT_5 = 0.75  # measured 0.933 through the stack (fp32; chance 0.02)
MIN_IMAGE_QUERY_P_AT_1 = 0.7  # measured 0.896 (`clipsearch evaluate`, 48 query images)
MIN_INT8_TOP10_OVERLAP = 0.9  # measured 0.983 over 48 text queries


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("shapes")
    demo_images.write_dataset(root / "images", DEMO_IMAGES, seed=1, queries=root / "queries")
    return root / "images", root / "queries"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shapes) -> dict[str, Path]:
    """The shipped checkpoint exported fp32 and int8 by `python -m model_export`, checked on shape images."""
    root = tmp_path_factory.mktemp("small-clip")
    models = {}
    for quantization in ("none", "int8"):
        out = root / quantization
        subprocess.run([sys.executable, "-m", "model_export", "--model", str(SMALL_CLIP_CHECKPOINT), "--quantize",
                        quantization, "--sample-photos", str(shapes[1]), "--out", str(out)], check=True)
        models[quantization] = out
    return models


@pytest.fixture(scope="module")
def cli(tmp_path_factory, exported, shapes):
    env = {**os.environ, "CLIPSEARCH_HOME": str(tmp_path_factory.mktemp("stack-home"))}
    for name in ("CLIPSEARCH_API_URL", "CLIPSEARCH_BUCKET"):
        env.pop(name, None)

    def run(*args: str, timeout: float = 600) -> dict:
        result = subprocess.run([str(CLIPSEARCH), *args, "--json"], env=env, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL, check=False)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    started = run("local", "up", "--model-dir", str(exported[SMALL_CLIP_QUANTIZATION]), timeout=400)
    assert started["model_id"].startswith("small_clip") and started["model_random_weights"] is False
    try:
        report = run("ingest", str(shapes[0]), "--dataset", DATASET, "--timeout", "600")
        assert report["indexed"] == DEMO_IMAGES, report
        yield run
    finally:
        subprocess.run([str(CLIPSEARCH), "local", "down"], env=env, check=True, timeout=120,
                       stdin=subprocess.DEVNULL, capture_output=True)


def test_text_queries_for_held_out_pairs_retrieve_them(cli):
    precision = []
    for colour, shape in sorted(demo_images.HELD_OUT):
        response = cli("search", "text", f"a {colour} {shape}", "--dataset", DATASET, "-k", "5")
        assert response["model"].startswith("small_clip")
        labels = [label_of(hit["key"]) for hit in response["results"]]
        precision.append(sum(label == f"{colour}-{shape}" for label in labels) / 5)
    print(f"\nheld-out text queries through the local stack: P@5 {np.mean(precision):.3f} per pair {precision}")
    assert np.mean(precision) >= MIN_HELD_OUT_TEXT_P_AT_5


def test_image_queries_find_their_class(cli, shapes):
    evaluation = cli("evaluate", "--queries", str(shapes[1]), "--dataset", DATASET)
    print(f"\nclipsearch evaluate on the demo shapes: {evaluation}")
    assert evaluation["queries"] == len(demo_images.COLOURS) * len(demo_images.SHAPES)
    assert evaluation["precision_at_1"] >= MIN_IMAGE_QUERY_P_AT_1


def test_int8_towers_rank_as_fp32_do(exported, shapes):
    images = sorted(shapes[0].glob("*.jpg"))
    labels = np.array([label_of(path.name) for path in images])
    pairs = [(colour, shape) for colour in demo_images.COLOURS for shape in demo_images.SHAPES]
    queries = [f"a {colour} {shape}" for colour, shape in pairs]
    rankings = {}
    for quantization, directory in exported.items():
        files = ModelFiles.open(directory)
        image_vectors = np.stack([embedding.vector for embedding in
                                  OnnxImageEncoder.from_model_files(files).embed_images([ImageInput(path.name, path) for path in images])])
        text_vectors = OnnxTextEncoder.from_model_files(files).embed_texts(queries)
        rankings[quantization] = np.argsort(-(text_vectors @ image_vectors.T), axis=1, kind="stable")[:, :10]
        held_out = [row for row, pair in enumerate(pairs) if pair in demo_images.HELD_OUT]
        for name, rows in (("held-out", held_out), ("all", range(len(pairs)))):
            relevant = [labels[rankings[quantization][row]] == "-".join(pairs[row]) for row in rows]
            print(f"\n{files.model_id} text->image, {name} pairs: P@1 {np.mean([hit[0] for hit in relevant]):.3f}, "
                  f"P@5 {np.mean([hit[:5].mean() for hit in relevant]):.3f}", end="")
    overlap = np.mean([len(set(fp32) & set(int8)) / 10 for fp32, int8 in zip(rankings["none"], rankings["int8"])])
    print(f"\nint8 vs fp32 text->image top-10 overlap over {len(queries)} queries: {overlap:.3f}")
    assert overlap >= MIN_INT8_TOP10_OVERLAP
