"""Static (calibrated) vs dynamic int8 quantization of the image tower: CPU time per image and agreement with fp32.

    .venv/bin/python benchmarks/quantization.py --fp32 DIR [--out /tmp/quantization-bench] [--rounds 5]
        [--variants dynamic,qdq-minmax,...]

DIR is an fp32 model directory (`python -m model_export ... --out DIR` without --quantize). Calibration uses the
seed-eval train/ photos (a deterministic sample); agreement uses the val/ photos, a random crop of each, each
val photo upscaled to 12 MP and stored as a camera JPEG, and the export's synthetic images, none of them seen
in calibration. Timing: time.process_time around session.run on batches of 8, 2 intra-op threads and 1, the
runtime's own session options; variants are interleaved round by round and the medians reported.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "shared"))

from benchmarks.bench_common import SEED_EVAL, cpu_description  # noqa: E402
from clipsearch.encoders import create_session  # noqa: E402
from model_export.samples import _image_processor, image_samples  # noqa: E402
from model_export.towers import VISION_GRAPH  # noqa: E402
from model_export.verify import agreement, neighbour_overlap  # noqa: E402

BATCH = 8
LARGE_SIZE = (4000, 3000)


class PixelBatches(CalibrationDataReader):
    """Calibration input for quantize_static: preprocessed pixels in batches, read once."""

    def __init__(self, pixel_values: np.ndarray, batch: int) -> None:
        self._batches = iter([pixel_values[start : start + batch] for start in range(0, len(pixel_values), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        pixels = next(self._batches, None)
        return None if pixels is None else {"pixel_values": pixels}


@dataclass(frozen=True)
class Variant:
    name: str
    build: Callable[[Path, Path, np.ndarray], None]


def _dynamic(source: Path, target: Path, _calibration: np.ndarray) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])


def _static(quant_format: str, method: str, per_channel: bool, ops: tuple[str, ...], activation: str = "QUInt8",
            extra: dict | None = None, weights_only: bool = False) -> Callable[[Path, Path, np.ndarray], None]:
    def build(source: Path, target: Path, calibration: np.ndarray) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        quantize_static(
            source,
            target,
            PixelBatches(calibration, BATCH),
            quant_format=QuantFormat[quant_format],
            op_types_to_quantize=list(ops),
            per_channel=per_channel,
            activation_type=QuantType[activation],
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod[method],
            extra_options=extra or {},
            nodes_to_exclude=_activation_matmuls(source) if weights_only else [],
        )

    return build


def _activation_matmuls(graph: Path) -> list[str]:
    """MatMuls of two activations (attention scores and their use), which quantize_dynamic leaves in fp32."""
    import onnx

    model = onnx.load(graph, load_external_data=False)
    constants = {initializer.name for initializer in model.graph.initializer}
    constants |= {output for node in model.graph.node if node.op_type == "Constant" for output in node.output}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and not constants & set(node.input)]


VARIANTS = {
    "dynamic": Variant("dynamic", _dynamic),
    "qop-minmax": Variant("qop-minmax", _static("QOperator", "MinMax", False, ("MatMul",))),
    "qdq-minmax": Variant("qdq-minmax", _static("QDQ", "MinMax", False, ("MatMul",))),
    "qop-minmax-weights": Variant("qop-minmax-weights", _static("QOperator", "MinMax", False, ("MatMul",),
                                                                 weights_only=True)),
    "qdq-minmax-weights": Variant("qdq-minmax-weights", _static("QDQ", "MinMax", False, ("MatMul",),
                                                                 weights_only=True)),
    "qdq-minmax-pc": Variant("qdq-minmax-pc", _static("QDQ", "MinMax", True, ("MatMul",))),
    "qop-minmax-pc": Variant("qop-minmax-pc", _static("QOperator", "MinMax", True, ("MatMul",))),
    "qop-pct": Variant("qop-pct", _static("QOperator", "Percentile", False, ("MatMul",),
                                           extra={"CalibPercentile": 99.999})),
    "qop-entropy": Variant("qop-entropy", _static("QOperator", "Entropy", False, ("MatMul",))),
    "qop-minmax-add": Variant("qop-minmax-add", _static("QOperator", "MinMax", False, ("MatMul", "Gemm", "Add"))),
    "qdq-minmax-s8": Variant("qdq-minmax-s8", _static("QDQ", "MinMax", False, ("MatMul",), activation="QInt8")),
}


def photo_paths(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))


def preprocess_paths(paths: list[Path], preprocess: dict) -> np.ndarray:
    processor = _image_processor(preprocess)
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            pixels.append(processor(images=image.convert("RGB"), return_tensors="np")["pixel_values"])
    return np.concatenate(pixels).astype(np.float32)


def twelve_megapixel(paths: list[Path], preprocess: dict) -> np.ndarray:
    """Each photo upscaled to 12 MP and stored as a quality-90 JPEG, then decoded and preprocessed in full."""
    processor = _image_processor(preprocess)
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            large = image.convert("RGB").resize(LARGE_SIZE, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        large.save(buffer, format="JPEG", quality=90)
        with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
            pixels.append(processor(images=decoded.convert("RGB"), return_tensors="np")["pixel_values"])
    return np.concatenate(pixels).astype(np.float32)


def embed(session, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [session.run(["image_embeds"], {"pixel_values": pixels[start : start + BATCH]})[0]
         for start in range(0, len(pixels), BATCH)]
    )


def cpu_ms_per_image(session, batch: np.ndarray, batches: int) -> tuple[float, float]:
    """(CPU ms per image, wall images/s) over `batches` runs of one batch."""
    started_cpu, started_wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        session.run(["image_embeds"], {"pixel_values": batch})
    cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started_wall
    return 1000 * cpu / (batches * len(batch)), batches * len(batch) / wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, required=True, help="fp32 model directory")
    parser.add_argument("--out", type=Path, default=Path("/tmp/quantization-bench"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="batches of 8 per variant per round")
    parser.add_argument("--calibration", type=int, default=64, help="train/ photos used for calibration")
    parser.add_argument("--threads", default="2,1")
    args = parser.parse_args(argv)

    print(cpu_description())
    preprocess = json.loads((args.fp32 / "preprocess.json").read_text())
    train = photo_paths(SEED_EVAL / "train")
    val = photo_paths(SEED_EVAL / "val")
    # A deterministic sample spread over the sorted train/ photos (every k-th), so all subjects are covered.
    step = max(1, len(train) // args.calibration)
    calibration = preprocess_paths(train[::step][: args.calibration], preprocess)
    held_out = image_samples(preprocess, SEED_EVAL / "val").pixel_values
    check = np.concatenate([held_out, twelve_megapixel(val, preprocess)])
    print(f"calibration: {len(calibration)} train/ photos; agreement: {len(check)} images "
          f"(val/ photos, crops, 12 MP JPEGs, synthetic)")

    fp32_graph = args.fp32 / VISION_GRAPH
    fp32_session = create_session(fp32_graph, 2)
    reference = embed(fp32_session, check)
    del fp32_session

    graphs, figures = {}, {}
    for name in args.variants.split(","):
        target = args.out / name / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            started = time.perf_counter()
            VARIANTS[name].build(fp32_graph, target, calibration)
            print(f"built {name} in {time.perf_counter() - started:.1f} s", flush=True)
        graphs[name] = target
        quantized = embed(create_session(target, 2), check)
        figures[name] = {"image": agreement(reference, quantized), "neighbours": neighbour_overlap(reference, quantized)}

    batch = check[:BATCH]
    timings: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for threads in (int(value) for value in args.threads.split(",")):
        sessions = {name: create_session(graph, threads) for name, graph in graphs.items()}
        for session in sessions.values():
            session.run(["image_embeds"], {"pixel_values": batch})
        for _ in range(args.rounds):
            for name, session in sessions.items():
                timings.setdefault((name, threads), []).append(cpu_ms_per_image(session, batch, args.batches))
        del sessions

    print(f"load average {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f}; "
          f"medians of {args.rounds} interleaved rounds of {args.batches} batches of {BATCH}")
    thread_counts = sorted({threads for _, threads in timings}, reverse=True)
    header = "| variant | " + " | ".join(f"CPU ms/img {t}T | img/s {t}T" for t in thread_counts)
    print(header + " | min cos | mean cos | top-10 overlap mean / min | size MB |")
    print("|" + "---|" * (2 * len(thread_counts) + 5))
    for name in graphs:
        cells = []
        for threads in thread_counts:
            runs = timings[(name, threads)]
            cells += [f"{statistics.median(r[0] for r in runs):.1f}", f"{statistics.median(r[1] for r in runs):.1f}"]
        figure = figures[name]
        print(f"| {name} | " + " | ".join(cells)
              + f" | {figure['image']['min_cosine']:.6f} | {figure['image']['mean_cosine']:.6f}"
              f" | {figure['neighbours']['mean_overlap']:.4f} / {figure['neighbours']['min_overlap']:.1f}"
              f" | {graphs[name].stat().st_size / 1e6:.1f} |")


if __name__ == "__main__":
    main()
