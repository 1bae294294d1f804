"""Benchmark the ONNX runtime (image and text towers, decoding, end to end) against PyTorch eager; prints a table.

Each model and the baseline run in their own process, so peak RSS is theirs alone. The baseline is what the
original project does: a PyTorch eager CLIPModel (random ViT-B/32, seed 0, via transformers), one image at a
time, Pillow full decoding + CLIPImageProcessor.

    .venv/bin/python benchmarks/embed.py [--models DIR ...] [--photos 48] [--large 8] [--threads 2]

Missing model directories are exported first (python -m model_export --random-arch vit-b-32 --seed 0 ...).
"""

from __future__ import annotations

import argparse
import io
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from bench_common import REPO, SEED_EVAL, TEXT_QUERIES, cpu_description, peak_rss_mib
from PIL import Image

DEFAULT_MODELS = [REPO / ".cache/models/random-vit-b-32-seed0", REPO / ".cache/models/random-vit-b-32-seed0-int8"]
BATCH_SIZES = (1, 8, 32)
LARGE_SIZE = (4000, 3000)
LONG_QUERY = " ".join(["a detailed photo of a colorful bird sitting on a branch near a lake"] * 8)


def timed(action: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    """Fastest of `repeats` runs after a warm-up: on a shared machine the minimum is the least disturbed."""
    if warm_up:
        action()
    durations = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        durations.append(time.perf_counter() - start)
    return min(durations)


def images_per_second(run_batch: Callable[[np.ndarray], object], pixels: np.ndarray, batch: int, images: int) -> float:
    """Best of 3 passes of at least `images` images each."""
    batches = [pixels[start : start + batch] for start in range(0, len(pixels) - batch + 1, batch)]
    rounds = math.ceil(images / batch)

    def one_pass() -> None:
        for index in range(rounds):
            run_batch(batches[index % len(batches)])

    return rounds * batch / timed(one_pass, 3)


def lanes_per_second(run_batch: Callable[[np.ndarray], object], pixels: np.ndarray, batch: int, lanes: int,
                     images: int) -> float:
    """Best of 3 passes of at least `images` images, `lanes` batches running at once."""
    from concurrent.futures import ThreadPoolExecutor

    rounds = max(lanes, math.ceil(images / batch))
    with ThreadPoolExecutor(lanes) as pool:

        def one_pass() -> None:
            list(pool.map(lambda index: run_batch(pixels[(index * batch) % (len(pixels) - batch + 1):][:batch]),
                          range(rounds)))

        return rounds * batch / timed(one_pass, 3)


def tower_input(pixel_values: list[np.ndarray]) -> np.ndarray:
    """Enough preprocessed photos for the largest batch (repeated when fewer photos were sampled)."""
    repeats = math.ceil(max(BATCH_SIZES) / len(pixel_values))
    return np.stack(pixel_values * repeats)[: max(BATCH_SIZES)]


def measure_onnx(model_dir: Path, photos: list[Path], large: list[Path], threads: int, tower_images: int,
                 rounds: int) -> dict:
    import onnxruntime as ort

    from clipsearch.encoders import DEFAULT_DECODE_WORKERS, OnnxImageEncoder, OnnxTextEncoder, create_session
    from clipsearch.images import DEFAULT_DRAFT_FACTOR, ImagePreprocessor
    from clipsearch.ports import ImageInput
    from clipsearch.model_files import ModelFiles

    files = ModelFiles.open(model_dir)
    files.verify()
    figures: dict[str, float] = {}
    start = time.perf_counter()
    text_session = create_session(files.text_graph, threads)
    figures["text session creation (s)"] = time.perf_counter() - start
    start = time.perf_counter()
    vision_session = create_session(files.vision_graph, threads)
    figures["image session creation (s)"] = time.perf_counter() - start

    preprocess = files.preprocess()
    full = ImagePreprocessor(preprocess, draft_factor=None)
    pixels = tower_input([full.prepare(path, path.name).pixel_values for path in photos[:32]])

    def run_vision(batch: np.ndarray) -> object:
        return vision_session.run(["image_embeds"], {"pixel_values": batch})

    tower = {batch: images_per_second(run_vision, pixels, batch, tower_images) for batch in BATCH_SIZES}
    for batch, speed in tower.items():
        figures[f"image tower img/s, batch {batch}"] = speed
    best_batch = max(tower, key=tower.get)
    figures["image tower best batch"] = best_batch
    # The alternative the encoder does not take: one single-threaded run per core at once on different
    # batches, instead of one batch at a time on `threads` threads (measured no better; see the README).
    lane_session = create_session(files.vision_graph, 1)
    lanes = max(2, threads)
    figures[f"image tower img/s, batch 8, {lanes} lanes x 1 thread"] = lanes_per_second(
        lambda batch: lane_session.run(["image_embeds"], {"pixel_values": batch}), pixels, 8, lanes, tower_images
    )

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    unflushed = ort.InferenceSession(str(files.vision_graph), options, providers=["CPUExecutionProvider"])
    figures["image tower img/s, batch 8, denormals kept"] = images_per_second(
        lambda batch: unflushed.run(["image_embeds"], {"pixel_values": batch}), pixels, 8, min(tower_images, 16)
    )

    text = OnnxTextEncoder(files.tokenizer(), text_session)
    figures["text query ms, true length"] = 1000 * statistics.mean(
        timed(lambda query=query: text.embed_text(query), 5) for query in TEXT_QUERIES
    )
    figures["text query tokens, true length (mean)"] = statistics.mean(
        len(text.tokenizer.encode(query).ids) for query in TEXT_QUERIES
    )
    padded = np.zeros((1, files.context_length), dtype=np.int64)
    ids = text.tokenizer.encode(TEXT_QUERIES[0]).ids
    padded[0, : len(ids)] = ids
    figures["text query ms, 77 tokens"] = 1000 * timed(
        lambda: text_session.run(["text_embeds"], {"input_ids": padded}), 10
    )
    figures["text long query ms (77 tokens, truncated)"] = 1000 * timed(lambda: text.embed_text(LONG_QUERY), 5)
    figures["tokenize us per query"] = 1e6 * timed(lambda: [text.tokenizer.encode(q) for q in TEXT_QUERIES], 20) / len(
        TEXT_QUERIES
    )

    photo_items = [ImageInput(path.name, path.read_bytes()) for path in photos]
    large_items = [ImageInput(path.name, path.read_bytes()) for path in large]
    for label, items in (("seed-eval", photo_items), ("large JPEG", large_items)):
        vectors = {}
        # Settings run in turn, round after round, each keeping its fastest round: on a shared machine a
        # burst of load then hits every setting alike instead of the one that happened to run during it.
        settings = {
            setting: OnnxImageEncoder(ImagePreprocessor(preprocess, draft_factor=draft_factor), vision_session,
                                      batch_size=best_batch, decode_workers=workers, decode_at_low_priority=low)
            for setting, draft_factor, workers, low in (
                ("decode workers 0", DEFAULT_DRAFT_FACTOR, 0, False),
                ("decode workers 1", DEFAULT_DRAFT_FACTOR, 1, False),
                ("decode workers 2", DEFAULT_DRAFT_FACTOR, 2, False),
                ("decode workers 2 at low priority", DEFAULT_DRAFT_FACTOR, 2, True),
                ("decode workers 2, draft factor 2", 2.0, 2, False),
                ("full decoding", None, DEFAULT_DECODE_WORKERS, False),
            )
        }
        walls = {setting: math.inf for setting in settings}
        cpus = {setting: math.inf for setting in settings}
        for setting, encoder in settings.items():
            vectors[setting] = np.stack([embedding.vector for embedding in encoder.embed_images(items)])
        for _ in range(rounds):
            for setting, encoder in settings.items():
                wall, cpu = time.perf_counter(), time.process_time()
                encoder.embed_images(items)
                walls[setting] = min(walls[setting], time.perf_counter() - wall)
                cpus[setting] = min(cpus[setting], time.process_time() - cpu)
        for setting in settings:
            figures[f"end-to-end img/s, {label}, {setting}"] = len(items) / walls[setting]
            figures[f"end-to-end CPU ms per image, {label}, {setting}"] = 1000 * cpus[setting] / len(items)
        for setting, row in (("decode workers 1", f"draft factor {DEFAULT_DRAFT_FACTOR:g} (default)"),
                             ("decode workers 2, draft factor 2", "draft factor 2")):
            cosines = np.sum(vectors[setting] * vectors["full decoding"], axis=1)
            figures[f"{row} vs full decoding min cosine, {label}"] = float(cosines.min())
    figures["peak RSS MiB"] = peak_rss_mib()
    return figures


def measure_torch(photos: list[Path], large: list[Path], threads: int, tower_images: int, tokenizer: Path) -> dict:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from clipsearch.tokenizer import ClipTokenizer

    torch.set_num_threads(threads)
    figures: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig()).eval()
    figures["model build (s, random init)"] = time.perf_counter() - start
    processor = CLIPImageProcessor()
    pixels = tower_input(
        [processor(images=Image.open(path), return_tensors="np")["pixel_values"][0] for path in photos[:32]]
    )

    with torch.inference_mode():

        def run_vision(batch: np.ndarray) -> object:
            return model.get_image_features(pixel_values=torch.from_numpy(batch))

        for batch in BATCH_SIZES:
            figures[f"image tower img/s, batch {batch}"] = images_per_second(run_vision, pixels, batch, tower_images)

        clip_tokenizer = ClipTokenizer.from_file(tokenizer)

        def embed_query(query: str, length: int | None) -> object:
            ids = clip_tokenizer.encode(query).ids
            row = np.zeros((1, length or len(ids)), dtype=np.int64)
            row[0, : len(ids)] = ids
            features = model.get_text_features(input_ids=torch.from_numpy(row))
            return features / features.norm(dim=-1, keepdim=True)

        figures["text query ms, true length"] = 1000 * statistics.mean(
            timed(lambda query=query: embed_query(query, None), 3) for query in TEXT_QUERIES
        )
        figures["text query ms, 77 tokens"] = 1000 * timed(lambda: embed_query(TEXT_QUERIES[0], 77), 5)

        def embed_one_at_a_time(paths: list[Path]) -> None:
            for path in paths:
                image = Image.open(io.BytesIO(path.read_bytes()))
                inputs = processor(images=image, return_tensors="pt")
                features = model.get_image_features(**inputs)
                features / features.norm(dim=-1, keepdim=True)

        for label, paths in (("seed-eval", photos), ("large JPEG", large)):
            seconds = timed(lambda paths=paths: embed_one_at_a_time(paths), 2)
            figures[f"end-to-end img/s, {label}"] = len(paths) / seconds
            cpu = time.process_time()
            embed_one_at_a_time(paths)
            figures[f"end-to-end CPU ms per image, {label}"] = 1000 * (time.process_time() - cpu) / len(paths)
    figures["peak RSS MiB"] = peak_rss_mib()
    return figures


def large_jpegs(photos: list[Path], count: int, directory: Path) -> list[Path]:
    """Seed-eval photos upscaled to 4000x3000 (12 MP), quality 90, as a camera would store them."""
    paths = []
    for photo in photos[:: max(1, len(photos) // count)][:count]:
        path = directory / f"{photo.stem}-12mp.jpg"
        with Image.open(photo) as image:
            image.convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def ensure_exported(model_dir: Path) -> None:
    if (model_dir / "manifest.json").is_file():
        return
    command = [sys.executable, "-m", "model_export", "--random-arch", "vit-b-32", "--seed", "0"]
    if model_dir.name.endswith("-int8"):
        command += ["--quantize", "int8"]
    command += ["--out", str(model_dir)]
    subprocess.run(command, check=True, cwd=REPO)


def in_child(function: Callable[..., dict], *args: object) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def print_table(columns: dict[str, dict[str, float]], baseline: dict[str, float]) -> None:
    names = list(columns)
    rows = list(dict.fromkeys(key for figures in columns.values() for key in figures))
    header = ["figure", *names, "torch baseline", *(f"{name} vs baseline" for name in names)]
    lines = [header]
    for row in rows:
        base = baseline.get(row)
        cells = [row] + [format_figure(row, columns[name].get(row)) for name in names] + [format_figure(row, base)]
        for name in names:
            value = columns[name].get(row)
            ratio = None
            if base and value and ("img/s" in row or " ms" in row):
                ratio = value / base if "img/s" in row else base / value
            cells.append(f"{ratio:.2f}x" if ratio else "")
        lines.append(cells)
    for row in baseline:
        if row not in rows:
            lines.append([row] + [""] * len(names) + [format_figure(row, baseline[row])] + [""] * len(names))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        cells = [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        print("  ".join([line[0].ljust(widths[0]), *cells]))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def format_figure(row: str, value: float | None) -> str:
    if value is None:
        return ""
    if "cosine" in row:
        return f"{value:.6f}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}" if value >= 10 else f"{value:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--photos", type=int, default=48, help="seed-eval photos for end-to-end figures")
    parser.add_argument("--large", type=int, default=8, help="generated 12 MP JPEGs")
    parser.add_argument("--tower-images", type=int, default=32, help="images per image-tower figure")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end rounds, settings interleaved")
    args = parser.parse_args(argv)

    all_photos = sorted(SEED_EVAL.glob("*/*.jp*g"))
    if not all_photos:
        raise SystemExit(f"no seed-eval photos at {SEED_EVAL}")
    photos = all_photos[:: max(1, len(all_photos) // args.photos)][: args.photos]
    for model_dir in args.models:
        ensure_exported(model_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="clipsearch-bench-") as scratch:
        large = large_jpegs(all_photos, args.large, Path(scratch))
        columns = {
            model_dir.name: in_child(measure_onnx, model_dir, photos, large, args.threads, args.tower_images,
                                     args.rounds)
            for model_dir in args.models
        }
        baseline = {}
        if not args.skip_baseline:
            tokenizer = args.models[0] / "tokenizer.json"
            baseline = in_child(measure_torch, photos, large, args.threads, args.tower_images, tokenizer)
    print(f"CPU: {cpu_description()}")
    print(f"{len(photos)} seed-eval photos, {len(large)} JPEGs of {LARGE_SIZE[0]}x{LARGE_SIZE[1]}, "
          f"{args.threads} threads, {time.perf_counter() - started:.0f} s\n")
    print_table(columns, baseline)
    for name, figures in columns.items():
        tower = max(value for key, value in figures.items() if key.startswith("image tower img/s, batch")
                    and "denormals" not in key)
        for label in ("seed-eval", "large JPEG"):
            end_to_end = max(value for key, value in figures.items()
                             if key.startswith(f"end-to-end img/s, {label}, decode workers")
                             and key.endswith(("workers 0", "workers 1", "workers 2")))
            print(f"{name}: {label} end-to-end / model-only = {end_to_end / tower:.0%}"
                  + (f", vs baseline {end_to_end / baseline[f'end-to-end img/s, {label}']:.1f}x" if baseline else ""))


if __name__ == "__main__":
    main()
