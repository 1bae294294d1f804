"""`clipsearch evaluate`: retrieval quality of a dataset, with labels taken from file-name prefixes.

A query file `beach.jpeg` (or `beach_3.jpeg`) is relevant to the dataset images named `beach_*`; the demo
shapes (`red-circle-0007.jpg`, queries `red-circle.jpg`, from clipsearch_tools.demo_images) label alike.
Precision@k averages, over the query files, the share of the top k results with the query's label;
Hits@k is the share of dataset images that find themselves (by their bucket key) in their own top k.
"""

from __future__ import annotations

import argparse
import mimetypes
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from clipsearch.datasets import dataset_prefix, has_image_suffix
from clipsearch.errors import ClipsearchError
from clipsearch_tools.cli.output import emit_json, note, random_weights_note, table
from clipsearch_tools.client import ClipsearchClient

CUTOFFS = (1, 5)
_NUMBER_SUFFIX = re.compile(r"[_-]\d+$")


def label_of(name: str) -> str:
    """`beach_03.jpeg` -> `beach`; `beach.jpeg` -> `beach`; `eiffel_tower_2.jpeg` -> `eiffel_tower`;
    `red-circle-0007.jpg` -> `red-circle`."""
    return _NUMBER_SUFFIX.sub("", PurePosixPath(name).stem).lower()


@dataclass(frozen=True)
class Evaluation:
    queries: int
    precision: dict[int, float]
    dataset_images: int
    hits: dict[int, float]


def evaluate(args: argparse.Namespace, client: ClipsearchClient) -> int:
    folder = Path(args.queries)
    if not folder.is_dir():
        raise ClipsearchError(f"not a folder: {folder}")
    queries = sorted(path for path in folder.iterdir() if path.is_file() and has_image_suffix(path.name))
    if not queries:
        raise ClipsearchError(f"no query images in {folder}")
    keys = [item.key for item in client.object_store().list(dataset_prefix(args.dataset)) if has_image_suffix(item.key)]
    if not keys:
        raise ClipsearchError(f"dataset {args.dataset!r} has no images in the bucket")
    depth = max(CUTOFFS)
    model = None
    precision = {k: 0.0 for k in CUTOFFS}
    for path in tqdm(queries, desc="queries", disable=None, leave=False):
        content_type = mimetypes.guess_type(path.name)[0] or "image/jpeg"
        response = client.search_image(args.dataset, path.read_bytes(), content_type, depth)
        model = response["model"]
        labels = [label_of(hit["key"]) for hit in response["results"]]
        for k in CUTOFFS:
            precision[k] += sum(label == label_of(path.name) for label in labels[:k]) / k
    hits = {k: 0 for k in CUTOFFS}
    for key in tqdm(keys, desc="self-retrieval", disable=None, leave=False):
        found = [hit["key"] for hit in client.search_stored_image(args.dataset, key, depth)["results"]]
        for k in CUTOFFS:
            hits[k] += key in found[:k]
    evaluation = Evaluation(
        queries=len(queries), precision={k: precision[k] / len(queries) for k in CUTOFFS},
        dataset_images=len(keys), hits={k: hits[k] / len(keys) for k in CUTOFFS},
    )
    if model and client.model_has_random_weights(model):
        note(random_weights_note(model))
    if args.json:
        emit_json({"dataset": args.dataset, "model": model, "queries": evaluation.queries,
                   "dataset_images": evaluation.dataset_images,
                   **{f"precision_at_{k}": round(value, 4) for k, value in evaluation.precision.items()},
                   **{f"hits_at_{k}": round(value, 4) for k, value in evaluation.hits.items()}})
        return 0
    print(f"dataset {args.dataset}, model {model}: {evaluation.queries} query images, "
          f"{evaluation.dataset_images} dataset images")
    table(["metric", "value"],
          [[f"Precision@{k}", f"{value:.3f}"] for k, value in evaluation.precision.items()]
          + [[f"Hits@{k} (self)", f"{value:.3f}"] for k, value in evaluation.hits.items()], right=(1,))
    return 0
