"""What a thumbnail adds to ingesting an image: embed_images with and without thumbnails, side by side.

Ingestion asks the encoder for a thumbnail made from the image it decodes anyway (ImageInput's
thumbnail_side), in its decode workers. Both settings run in this process, interleaved, on the same
images (bytes in memory, so storage is left out: a thumbnail adds one PUT per image, issued from the
fetch pool while the next chunk embeds); the best pass of each counts.

    .venv/bin/python benchmarks/thumbnails.py [--model-dir DIR] [--photos N] [--repeats N] [--images DIR]
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
from clipsearch.thumbnails import LONGEST_SIDE

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=MODELS / "random-vit-b-32-seed0-int8")
    parser.add_argument("--photos", type=int, default=100, help="how many seed-eval photos")
    parser.add_argument("--images", type=Path, help="a folder of images to use instead of seed-eval")
    parser.add_argument("--repeats", type=int, default=3, help="the best of this many passes counts")
    args = parser.parse_args(argv)

    if args.images:
        files = sorted(path for path in args.images.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)
    else:
        files = sorted((SEED_EVAL / "train").glob("*.jp*g"))[: args.photos]
    images = [(path.name, path.read_bytes()) for path in files]
    encoder = OnnxImageEncoder.from_model_files(ModelFiles.open(args.model_dir))
    encoder.embed_images([ImageInput(name, data) for name, data in images[:4]])  # warm the session

    seconds: dict[int | None, list[float]] = {None: [], LONGEST_SIDE: []}
    cpu_seconds: dict[int | None, list[float]] = {None: [], LONGEST_SIDE: []}
    sizes: list[int] = []
    for _ in range(args.repeats):
        for side in seconds:
            started, cpu_started = time.perf_counter(), time.process_time()
            results = encoder.embed_images([ImageInput(name, data, side) for name, data in images])
            seconds[side].append(time.perf_counter() - started)
            cpu_seconds[side].append(time.process_time() - cpu_started)
            if side:
                sizes = [len(result.thumbnail) for result in results if getattr(result, "thumbnail", None)]

    without, with_ = (min(seconds[side]) * 1000 / len(images) for side in (None, LONGEST_SIDE))
    cpu_without, cpu_with = (min(cpu_seconds[side]) * 1000 / len(images) for side in (None, LONGEST_SIDE))
    print(cpu_description())
    print(f"model {args.model_dir.name}, {len(images)} images ({args.images or 'seed-eval'}), best of {args.repeats}")
    print(f"embedding without thumbnails {without:7.2f} ms/image")
    print(f"embedding with thumbnails    {with_:7.2f} ms/image  ({len(sizes)} WebP, median "
          f"{statistics.median(sizes) / 1024:.1f} KiB)")
    print(f"CPU time (all threads): {cpu_without:.2f} -> {cpu_with:.2f} ms/image, {cpu_with / cpu_without - 1:+.1%}")
    print(f"thumbnails add {with_ / without - 1:+.1%} per image, wall clock (target <= +10%)")


if __name__ == "__main__":
    main()
