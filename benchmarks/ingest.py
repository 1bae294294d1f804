"""Benchmark ingestion as a user runs it: `clipsearch ingest DIR` on the local stack (upload -> searchable), next
to the model-only throughput of the same model on the same files, measured in the same run.

The image set mixes small photos (seed-eval photos re-cropped, recoloured and resized, 0.1-0.5 MP JPEGs)
with large wallpapers (2560x1440 to 3840x2160) stored as PNG, WebP and JPEG, every file unique. Model-only
is OnnxImageEncoder.embed_images over the files' bytes already in memory (decode + preprocess + inference
in one process, with the encoder's defaults; and as one single-threaded encoder per core, each on its share of the
files, as the local stack runs its preprocessing instances; the faster is the reference): everything but the
object store, the queue and the catalog.
End to end is a fresh local stack (`clipsearch local up`) warmed by an untimed ingest of 64 other photos into
another dataset (so that, as in model-only, the measured images meet instances with their model sessions open),
then `clipsearch ingest DIR` timed from its start (hashing, uploads, S3 notifications, queue, preprocess function
instances, thumbnails, segment writes, commits) until the catalog counts every image indexed. CPU time per image
is printed for each part of the stack and for model-only (process CPU time: other load on the machine does not
count in it), with their ratio, the throughput ratio the stack reaches when both keep the cores busy. It also times decoding alone per format, which bounds large
PNG/WebP files (no reduced-size decoding exists for them, unlike JPEG's DCT scaling).

    .venv/bin/python benchmarks/ingest.py [--photos 900] [--large 120] [--preprocess-concurrency N] [--onnx-threads N]
    .venv/bin/python benchmarks/ingest.py --photos 150 --large 15          # quick run, ~2 min
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from bench_common import MODELS, REPO, SEED_EVAL, cpu_description
from PIL import Image, ImageEnhance

DEFAULT_MODEL = MODELS / "random-vit-b-32-seed0-int8"
EXPORT_HINT = "python -m model_export --random-arch vit-b-32 --seed 0 --quantize int8 --out " + str(DEFAULT_MODEL)
WALLPAPER_SIZES = ((2560, 1440), (3840, 2160), (3440, 1440), (2880, 1800))
LARGE_FORMATS = (("PNG", ".png", {"compress_level": 6}), ("WEBP", ".webp", {"quality": 90}),
                 ("JPEG", ".jpg", {"quality": 92}))
CLI = [str(Path(sys.executable).with_name("clipsearch"))]  # the console script a user runs
# Enough messages for every preprocessing instance to get a batch and open its model session before timing.
WARM_UP_IMAGES = 64


def make_images(folder: Path, photos: int, large: int, seed: int = 0) -> dict[str, list[Path]]:
    """Unique files: small photo JPEGs and large wallpapers in PNG, WebP and JPEG (one format in turn)."""
    rng = np.random.default_rng(seed)
    sources = sorted(SEED_EVAL.glob("*/*.jp*g"))
    if not sources:
        sys.exit(f"no seed-eval photos under {SEED_EVAL}")
    bases = [Image.open(path).convert("RGB") for path in sources]
    made: dict[str, list[Path]] = {"photo": [], "PNG": [], "WEBP": [], "JPEG": []}
    (folder / "photos").mkdir(parents=True)
    (folder / "wallpapers").mkdir()
    for position in range(photos):
        base = bases[position % len(bases)]
        side = rng.uniform(0.55, 1.0)
        width, height = int(base.width * side), int(base.height * side)
        left, top = rng.integers(0, base.width - width + 1), rng.integers(0, base.height - height + 1)
        megapixels = rng.uniform(0.1, 0.5)
        scale = (megapixels * 1e6 / (width * height)) ** 0.5
        tile = base.crop((left, top, left + width, top + height))
        tile = tile.resize((max(32, int(width * scale)), max(32, int(height * scale))), Image.Resampling.BICUBIC)
        tile = ImageEnhance.Color(tile).enhance(rng.uniform(0.7, 1.3))
        path = folder / "photos" / f"photo-{position:05d}.jpg"
        tile.save(path, "JPEG", quality=int(rng.integers(75, 95)))
        made["photo"].append(path)
    for position in range(large):
        image_format, suffix, options = LARGE_FORMATS[position % len(LARGE_FORMATS)]
        size = WALLPAPER_SIZES[position % len(WALLPAPER_SIZES)]
        base = bases[(position * 7) % len(bases)].resize(size, Image.Resampling.BICUBIC)
        base = ImageEnhance.Brightness(base).enhance(rng.uniform(0.8, 1.2))
        pixels = np.asarray(base, dtype=np.int16) + rng.integers(-4, 5, (size[1], size[0], 1), dtype=np.int16)
        path = folder / "wallpapers" / f"wallpaper-{position:04d}{suffix}"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, image_format, **options)
        made[image_format].append(path)
    return made


def measure_model_only(model_dir: Path, groups: dict[str, list[str]], threads: int) -> dict[str, float]:
    """In a child process: img/s of embed_images over bytes in memory, for all files (the better of two passes)
    and per group, and the decode+preprocess time alone per image for each group (one core)."""
    from clipsearch.encoders import OnnxImageEncoder
    from clipsearch.model_files import ModelFiles
    from clipsearch.ports import ImageInput

    encoder = OnnxImageEncoder.from_model_files(ModelFiles.open(model_dir), threads or None)
    loaded = {name: [ImageInput(Path(path).name, Path(path).read_bytes()) for path in paths]
              for name, paths in groups.items()}
    everything = [item for items in loaded.values() for item in items]
    encoder.embed_images(everything[: encoder.batch_size * 2])  # warm-up: session creation, first runs
    figures = {"all": 0.0, "cpu ms": float("inf")}
    for _ in range(2):  # the better of two passes: this machine's speed moves with its neighbours
        started, cpu_started = time.perf_counter(), time.process_time()
        results = encoder.embed_images(everything)
        figures["all"] = max(figures["all"], len(everything) / (time.perf_counter() - started))
        figures["cpu ms"] = min(figures["cpu ms"], 1000 * (time.process_time() - cpu_started) / len(everything))
        if not all(hasattr(result, "vector") for result in results):
            raise RuntimeError("model-only run failed on some images")
    for name, items in loaded.items():
        if not items:
            continue
        started = time.perf_counter()
        encoder.embed_images(items)
        figures[name] = len(items) / (time.perf_counter() - started)
        sample = items[: min(len(items), 12)]
        started = time.perf_counter()
        for item in sample:
            encoder.preprocessor.prepare(item.data, item.name)
        figures[f"{name} decode ms"] = 1000 * (time.perf_counter() - started) / len(sample)
    return figures


def _lane(model_dir: Path, paths: list[str], barrier, results) -> None:
    """One single-threaded encoder (as each preprocessing instance of the local stack runs) over its share."""
    from clipsearch.encoders import OnnxImageEncoder
    from clipsearch.model_files import ModelFiles
    from clipsearch.ports import ImageInput

    encoder = OnnxImageEncoder.from_model_files(ModelFiles.open(model_dir), 1)
    items = [ImageInput(Path(path).name, Path(path).read_bytes()) for path in paths]
    encoder.embed_images(items[: encoder.batch_size * 2])
    barrier.wait()
    started, cpu_started = time.time(), time.process_time()
    encoder.embed_images(items)
    results.put((started, time.time(), len(items), time.process_time() - cpu_started))


def measure_lanes(model_dir: Path, paths: list[str], lanes: int) -> tuple[float, float]:
    """img/s of `lanes` processes with one ONNX thread each, the files split between them, started together,
    and their CPU milliseconds per image (all their threads: decoding and inference)."""
    context = get_context("spawn")
    barrier, results = context.Barrier(lanes), context.Queue()
    processes = [context.Process(target=_lane, args=(model_dir, paths[lane::lanes], barrier, results))
                 for lane in range(lanes)]
    for process in processes:
        process.start()
    spans = [results.get(timeout=3600) for _ in processes]
    for process in processes:
        process.join()
    images = sum(span[2] for span in spans)
    return (images / (max(span[1] for span in spans) - min(span[0] for span in spans)),
            1000 * sum(span[3] for span in spans) / images)


def in_child(function, *args):
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run_cli(arguments: list[str], home: Path, timeout: float) -> dict:
    completed = subprocess.run([*CLI, *arguments, "--home", str(home), "--json"], capture_output=True, text=True,
                               timeout=timeout, cwd=REPO, env={**os.environ, "CLIPSEARCH_HOME": str(home)})
    if completed.returncode not in (0, 3):  # 3: some images failed, reported in the document
        raise RuntimeError(f"clipsearch {' '.join(arguments)} failed ({completed.returncode}):\n{completed.stderr}")
    return json.loads(completed.stdout)


def make_warm_up(folder: Path, photos: list[Path], count: int) -> Path:
    """Copies of the first photos, re-encoded so that none equals a measured file (the stack would skip it)."""
    folder.mkdir(parents=True)
    for position, path in enumerate(photos[:count]):
        with Image.open(path) as image:
            image.convert("RGB").rotate(180).save(folder / f"warm-up-{position:03d}.jpg", "JPEG", quality=90)
    return folder


def end_to_end(model_dir: Path, folder: Path, home: Path, up_options: list[str],
               warm_up: Path) -> tuple[dict, float, dict, int]:
    """`local up` and a warm-up ingest into another dataset (not timed: as model-only, the measured part runs on
    warm instances with their model sessions open), then `clipsearch ingest` timed; the stack is stopped
    afterwards. Also returns the CPU seconds each part of the path used meanwhile."""
    import resource

    run_cli(["local", "up", "--model-dir", str(model_dir), *up_options], home, 600)
    try:
        run_cli(["ingest", str(warm_up), "--dataset", "warmup"], home, 600)
        log_offset = (home / "logs" / "stack.log").stat().st_size
        before, cli_before = stack_cpu_seconds(home), resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        report = run_cli(["ingest", str(folder), "--dataset", "bench"], home, 3600)
        seconds = time.perf_counter() - started
        after, cli_after = stack_cpu_seconds(home), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = {part: after.get(part, 0.0) - before.get(part, 0.0) for part in after}
        cpu["clipsearch ingest (CLI: hashing, uploads, polling)"] = (
            cli_after.ru_utime + cli_after.ru_stime - cli_before.ru_utime - cli_before.ru_stime)
        return report, seconds, cpu, log_offset
    finally:
        subprocess.run([*CLI, "local", "down", "--home", str(home)], capture_output=True, timeout=300, cwd=REPO)


def stack_cpu_seconds(home: Path) -> dict[str, float]:
    """CPU seconds so far of the stack's processes (the supervisor and its descendants, and the PostgreSQL
    server of its home), by part."""
    ticks = os.sysconf("SC_CLK_TCK")
    processes = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        processes[int(entry.name)] = (b" ".join(argv).decode(errors="replace"), int(fields[1]),
                                      (int(fields[11]) + int(fields[12])) / ticks)
    supervisor = json.loads((home / "state.json").read_text())["pid"] if (home / "state.json").exists() else None
    roots = {pid for pid, (command, _, _) in processes.items()
             if pid == supervisor or ("postgres" in command and str(home) in command)}
    totals: dict[str, float] = {}
    for pid, (command, parent, cpu) in processes.items():
        ancestor = pid
        while ancestor not in roots and ancestor in processes and ancestor > 1:
            ancestor = processes[ancestor][1]
        if ancestor not in roots:
            continue
        if "function_runtime" in command and _function_directory(pid) == "preprocess":
            part = "preprocess instances (fetch, decode, embed, thumbnail, commit)"
        elif "function_runtime" in command:
            name = _function_directory(pid)
            part = f"{name} instances" + (" (the CLI's progress polls)" if name == "datasets" else "")
        elif "weed" in command.split(" ")[0]:
            part = "SeaweedFS (object store)"
        elif "postgres" in command:
            part = "PostgreSQL"
        else:
            part = "supervisor (SQS stand-in, change feed, queue runner, gateway)"
        totals[part] = totals.get(part, 0.0) + cpu
    return totals


def _function_directory(pid: int) -> str:
    """The function a local instance runs: its working directory is the function's code (functions/<name>)."""
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).name
    except OSError:
        return "gone"


def handler_breakdown(log_file: Path, offset: int) -> dict[str, float]:
    """Seconds summed over the preprocess function's invocations, from the ingest metrics in the stack log
    after `offset` (its size when the timed ingest started)."""
    totals: dict[str, float] = {}
    if not log_file.exists():
        return totals
    with log_file.open("rb") as log:
        log.seek(offset)
        lines = log.read().decode(errors="replace").splitlines()
    for line in lines:
        start = line.find("{")
        if start < 0 or '"_aws"' not in line:
            continue
        try:
            document = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        for name in ("FetchWaitSeconds", "ClaimSeconds", "DecodeEmbedSeconds", "SegmentCommitSeconds", "BatchLatency"):
            value = document.get(name)
            if isinstance(value, list):
                value = sum(value)
            if isinstance(value, (int, float)):
                totals[name] = totals.get(name, 0.0) + (value / 1000 if name == "BatchLatency" else value)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=900, help="small photo JPEGs (0.1-0.5 MP)")
    parser.add_argument("--large", type=int, default=120, help="large wallpapers, PNG/WebP/JPEG in turn")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=0, help="model-only ORT threads (0: all cores)")
    parser.add_argument("--preprocess-concurrency", type=int, help="passed to `clipsearch local up`")
    parser.add_argument("--onnx-threads", type=int, help="passed to `clipsearch local up`")
    args = parser.parse_args()
    if not (args.model / "manifest.json").exists():
        sys.exit(f"{args.model} is missing; export it first:\n  {EXPORT_HINT}")
    up_options = []
    if args.preprocess_concurrency:
        up_options += ["--preprocess-concurrency", str(args.preprocess_concurrency)]
    if args.onnx_threads is not None:
        up_options += ["--onnx-threads", str(args.onnx_threads)]

    print(f"CPU: {cpu_description()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="clipsearch-ingest-bench-") as scratch:
        folder = Path(scratch) / "images"
        groups = make_images(folder, args.photos, args.large)
        files = [path for paths in groups.values() for path in paths]
        total_bytes = sum(path.stat().st_size for path in files)
        megapixels = statistics.mean(Image.open(path).width * Image.open(path).height / 1e6 for path in files)
        print(f"{len(files)} unique images ({len(groups['photo'])} photos, "
              f"{sum(len(groups[f]) for f in ('PNG', 'WEBP', 'JPEG'))} wallpapers as PNG/WebP/JPEG), "
              f"{total_bytes / 2**20:.0f} MiB, {megapixels:.2f} MP mean", flush=True)
        model = in_child(measure_model_only, args.model,
                         {name: [str(path) for path in paths] for name, paths in groups.items()}, args.threads)
        lanes, lanes_cpu_ms = measure_lanes(args.model, [str(path) for path in files], os.cpu_count() or 1)
        print(f"model-only: {model['all']:.1f} img/s with one {args.threads or 'all-core'}-thread session, "
              f"{lanes:.1f} img/s as {os.cpu_count()} one-thread processes (the better one is the reference); "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        model["one session"], model["lanes"], model["lanes cpu ms"] = model["all"], lanes, lanes_cpu_ms
        model["all"] = max(model["all"], lanes)
        warm_up = make_warm_up(Path(scratch) / "warm-up", groups["photo"], WARM_UP_IMAGES)
        home = Path(scratch) / "stack"
        report, seconds, cpu, log_offset = end_to_end(args.model, folder, home, up_options, warm_up)
        breakdown = handler_breakdown(home / "logs" / "stack.log", log_offset)

    rate = len(files) / seconds
    print(f"\nmodel {args.model.name}; local stack options: {' '.join(up_options) or '(defaults)'}")
    print(f"{'':34}{'img/s':>8}{'ratio to model-only':>22}")
    print(f"{'model-only, one session':34}{model['one session']:>8.1f}")
    print(f"{'model-only, one process per core':34}{model['lanes']:>8.1f}")
    print(f"{'upload -> searchable (local stack)':34}{rate:>8.1f}{rate / model['all']:>21.0%}  "
          f"({len(files)} images in {seconds:.1f} s; indexed {report['indexed']}, failed {len(report['failed'])})")
    print("\nper group, model-only (decode + preprocess alone, ms per image on one core):")
    for name in ("photo", "PNG", "WEBP", "JPEG"):
        if name in model:
            print(f"  {name:<8}{model[name]:>8.1f} img/s   decode {model[f'{name} decode ms']:>6.1f} ms")
    print(f"\nCPU seconds during the {seconds:.1f} s ingest ({os.cpu_count()} cores = "
          f"{seconds * (os.cpu_count() or 1):.0f} CPU-seconds available; load average at the end "
          f"{os.getloadavg()[0]:.1f}), and per image:")
    for part, used in sorted(cpu.items(), key=lambda item: -item[1]):
        print(f"  {part:<66}{used:>8.1f} s{1000 * used / len(files):>8.1f} ms")
    total = sum(cpu.values())
    stack_ms, lanes_ms = 1000 * total / len(files), model["lanes cpu ms"]
    print(f"  {'all parts':<66}{total:>8.1f} s{stack_ms:>8.1f} ms")
    print(f"\nCPU ms per image (process CPU time, so other load on the machine does not count): model-only "
          f"{lanes_ms:.1f} as one-thread processes, {model['cpu ms']:.1f} as one session; the stack {stack_ms:.1f}; "
          f"model-only / stack = {lanes_ms / stack_ms:.0%} (the throughput ratio when both keep the cores busy)")
    if breakdown:
        print("\npreprocess function, seconds summed over invocations: "
              + ", ".join(f"{name} {value:.1f}" for name, value in breakdown.items()))


if __name__ == "__main__":
    main()
