"""The `python -m model_export` command: parse arguments, report progress on stderr, map refusals to exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from model_export.checkpoint import RANDOM_ARCHITECTURES, build_random_checkpoint, load_checkpoint
from model_export.errors import ExportError
from model_export.export import QUANTIZATIONS, ExportOptions, check_output_dir, export_model

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
# The shared seed-eval photos sit beside the repository checkout; the export checks itself on them when present.
DEFAULT_SAMPLE_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "seed-eval"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging()
    try:
        return _run(args)
    except ExportError as error:
        logging.getLogger("model_export").error("%s", error)
        return 2


def _run(args: argparse.Namespace) -> int:
    log = logging.getLogger("model_export")
    started = time.monotonic()
    options = ExportOptions(
        out=args.out,
        quantization=args.quantize,
        force=args.force,
        threads=args.threads,
        opset=args.opset,
        sample_photos=args.sample_photos,
    )
    check_output_dir(options.out, options.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_arch:
        log.info("building random-weight CLIP %s with seed %d", args.random_arch, args.seed)
        checkpoint = build_random_checkpoint(args.random_arch, args.seed)
    else:
        log.info("loading checkpoint %s", args.model)
        checkpoint = load_checkpoint(args.model)
    manifest = export_model(checkpoint, options)
    parity = manifest["parity"]
    log.info(
        "done in %.1f s: %s, ONNX vs PyTorch min cosine text %.8f image %.8f",
        time.monotonic() - started,
        manifest["model_id"],
        parity["onnx_vs_torch"]["text"]["min_cosine"],
        parity["onnx_vs_torch"]["image"]["min_cosine"],
    )
    if "int8_vs_fp32" in parity:
        int8 = parity["int8_vs_fp32"]
        log.info(
            "int8 (%s) vs fp32: text min/mean cosine %.6f/%.6f, image %.6f/%.6f, image overlap@10 %.4f",
            int8["weight_type"],
            int8["text"]["min_cosine"],
            int8["text"]["mean_cosine"],
            int8["image"]["min_cosine"],
            int8["image"]["mean_cosine"],
            int8["image_neighbours"]["mean_overlap"],
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model_export",
        description="Export a CLIP checkpoint as two ONNX towers plus tokenizer, preprocessing and manifest.",
        epilog="Exit status: 0 published, 2 refused (nothing written).",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model id or local checkpoint directory")
    source.add_argument("--random-arch", choices=RANDOM_ARCHITECTURES, help="build a random-weight CLIP locally")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-arch (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none", help="dynamic int8 quantization")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--threads", type=int, help="threads for PyTorch and onnxruntime")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's choice)")
    parser.add_argument(
        "--sample-photos",
        type=Path,
        default=DEFAULT_SAMPLE_PHOTOS if DEFAULT_SAMPLE_PHOTOS.is_dir() else None,
        help="folder of photos to check the export on (default: the shared seed-eval photos when present)",
    )
    return parser


def _configure_logging() -> None:
    started = time.monotonic()

    class ElapsedFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"[{time.monotonic() - started:6.1f}s] {record.getMessage()}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ElapsedFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("model_export").setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
