"""What a thumbnail adds to ingesting an image: make_thumbnail next to embedding, per seed-eval photo.

Both run in this process on the same photos (bytes in memory, so storage is left out: it adds one PUT
per image, issued from the fetch pool while the next chunk embeds). The share printed is the
thumbnail's CPU time over embedding's, an upper bound of what it adds to a batch's time on these cores.

    .venv/bin/python benchmarks/thumbnails.py [--model-dir DIR] [--photos N] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench_common import MODELS, SEED_EVAL, cpu_description
from clipsearch.encoders import OnnxImageEncoder
from clipsearch.model_files import ModelFiles
from clipsearch.ports import ImageInput
from clipsearch.thumbnails import make_thumbnail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=MODELS / "random-vit-b-32-seed0-int8")
    parser.add_argument("--photos", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many passes counts")
    args = parser.parse_args(argv)

    photos = sorted((SEED_EVAL / "train").glob("*.jp*g"))[: args.photos]
    images = [(photo.name, photo.read_bytes()) for photo in photos]
    encoder = OnnxImageEncoder.from_model_files(ModelFiles.open(args.model_dir))
    encoder.embed_images([ImageInput(name, data) for name, data in images[:4]])  # warm the session

    embed, thumbnail, sizes = [], [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        encoder.embed_images([ImageInput(name, data) for name, data in images])
        embed.append(time.perf_counter() - started)
        started = time.perf_counter()
        sizes = [len(make_thumbnail(data)) for _, data in images]
        thumbnail.append(time.perf_counter() - started)

    embed_ms, thumbnail_ms = min(embed) * 1000 / len(images), min(thumbnail) * 1000 / len(images)
    print(cpu_description())
    print(f"model {args.model_dir.name}, {len(images)} seed-eval photos, best of {args.repeats}")
    print(f"embedding   {embed_ms:7.2f} ms/image")
    print(f"thumbnail   {thumbnail_ms:7.2f} ms/image  (WebP, median {statistics.median(sizes) / 1024:.1f} KiB)")
    print(f"thumbnail / embedding: {thumbnail_ms / embed_ms:.1%} (target <= 10%)")


if __name__ == "__main__":
    main()
