"""The `python -m model_export` command: parse arguments, report progress on stderr, map refusals to exit 2."""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from model_export.errors import ExportError
from model_export.options import QUANTIZATIONS, RANDOM_ARCHITECTURES, ExportOptions
from model_export.publish import check_output_dir

DEFAULT_MODEL = "openai/clip-vit-base-patch32"
# The shared seed-eval photos sit beside the repository checkout; the export checks itself on them when present.
DEFAULT_SAMPLE_PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "seed-eval"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _configure_logging()
    try:
        return _run(args)
    except ExportError as error:
        logging.getLogger("model_export").error("error: %s", error)
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
    # torch, transformers and optimum take 5-10 s to import: refuse bad arguments before paying for them.
    import torch

    from model_export.checkpoint import build_random_checkpoint, load_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_arch:
        log.info("building random-weight CLIP %s with seed %d", args.random_arch, args.seed)
        checkpoint = build_random_checkpoint(args.random_arch, args.seed)
    else:
        log.info("loading checkpoint %s", args.model)
        checkpoint = load_checkpoint(args.model)
    from model_export.export import export_model

    manifest = export_model(checkpoint, options)
    log.info("done in %.1f s: %s at %s", time.monotonic() - started, manifest["model_id"], options.out)
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


class _ElapsedFormatter(logging.Formatter):
    """Prefix each progress line with the seconds since the command started."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.monotonic()

    def format(self, record: logging.LogRecord) -> str:
        return f"[{time.monotonic() - self.started:6.1f}s] {record.getMessage()}"


def _configure_logging() -> None:
    # Tracing a transformer always warns about Python branches frozen into the graph; the parity check
    # is what tells whether the graph is right, so these warnings only bury the progress lines.
    warnings.filterwarnings("ignore", message="Converting a tensor to a Python")
    # CLIP pools the text at argmax positions, which are never the negative indices this warns about.
    warnings.filterwarnings("ignore", message="Exporting aten::index operator of advanced indexing")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ElapsedFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("model_export").setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
