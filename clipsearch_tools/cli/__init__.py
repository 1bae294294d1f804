"""The `clipsearch` command: parse arguments, run one command, turn every failure into one line and an exit code.

Exit codes: 0 done, 1 failed, 2 bad usage, 3 ingest finished but some images failed to index.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime

from clipsearch.errors import ClipsearchError

DEBUG_ENV = "CLIPSEARCH_DEBUG"  # set to 1 for tracebacks instead of one-line errors


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the whole usage block
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("clipsearch_tools.local.models").setLevel(logging.INFO)  # export progress is worth seeing
    if not getattr(args, "run", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout (| head) went away: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as error:
        if os.environ.get(DEBUG_ENV):
            raise
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if isinstance(error, ClipsearchError) else f"{type(error).__name__}: {text}"


def _with_client(command: Callable) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from clipsearch_tools.client import ClipsearchClient, resolve_target

        return command(args, ClipsearchClient(resolve_target(args.api_url, args.bucket, args.home)))

    return run


def _k(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"k must be a whole number, not {value!r}") from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {value!r}")
    return int(value)


def _non_negative(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, not {value!r}")
    return int(value)


def _moment(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a date or time in ISO 8601 (2026-01-31T18:00), not {value!r}") \
            from None
    return moment if moment.tzinfo else moment.astimezone()


def _build_parser() -> argparse.ArgumentParser:
    from clipsearch_tools.cli import (
        evaluate,
        ingest_commands,
        local_commands,
        maintenance,
        search_commands,
    )

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    common.add_argument("--home", help="local stack home (default $CLIPSEARCH_HOME or ./.clipsearch)")
    remote = argparse.ArgumentParser(add_help=False, parents=[common])
    remote.add_argument("--api-url", help="a deployed stack's API URL (default $CLIPSEARCH_API_URL, else local)")
    remote.add_argument("--bucket", help="a deployed stack's bucket (default $CLIPSEARCH_BUCKET)")

    parser = _Parser(prog="clipsearch", description="Image search with CLIP: ingest folders, search by text or image.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_Parser)

    local = commands.add_parser("local", help="run the whole stack on this machine")
    local_commands_ = local.add_subparsers(title="local commands", metavar="COMMAND", parser_class=_Parser)
    up = local_commands_.add_parser("up", parents=[common], help="start the local stack in the background")
    up.add_argument("--model-dir", help="an exported model directory (default: export one into the home)")
    up.add_argument("--template", help="the SAM template to read routes from (default: the repository's)")
    up.add_argument("--timeout", type=float, default=300, help="seconds to wait for readiness (default 300)")
    up.add_argument("--preprocess-concurrency", type=_positive, metavar="N",
                    help="preprocessing batches run at once, each on its own function instance (default: one per "
                         "core, $CLIPSEARCH_LOCAL_PREPROCESS_CONCURRENCY; never above the template's MaximumConcurrency)")
    up.add_argument("--onnx-threads", type=_non_negative, metavar="N",
                    help="CLIPSEARCH_ONNX_THREADS of each preprocessing instance, replacing the template's (default: "
                         "cores / concurrency, $CLIPSEARCH_LOCAL_ONNX_THREADS; 0: onnxruntime's own choice)")
    up.set_defaults(run=local_commands.up)
    down = local_commands_.add_parser("down", parents=[common], help="stop the local stack")
    down.add_argument("--timeout", type=float, default=120)
    down.set_defaults(run=local_commands.down)
    local_commands_.add_parser("status", parents=[common], help="check each part of the local stack") \
        .set_defaults(run=local_commands.status)
    local_commands_.add_parser(
        "env", parents=[common], help="print `export ...` for uploading with aws s3 cp, rclone or boto3",
    ).set_defaults(run=local_commands.env)

    ingest = commands.add_parser("ingest", parents=[remote], help="upload a folder's images and index them")
    ingest.add_argument("dir", help="folder of images (searched recursively)")
    ingest.add_argument("--dataset", required=True)
    ingest.add_argument("--workers", type=int, default=8, help="concurrent uploads (default 8)")
    ingest.add_argument("--timeout", type=float, default=1800, help="seconds to wait for indexing (default 1800)")
    ingest.add_argument("--no-wait", action="store_true", help="return after uploading")
    ingest.set_defaults(run=_with_client(ingest_commands.ingest))

    search = commands.add_parser("search", help="search a dataset by text or by an image")
    kinds = search.add_subparsers(title="search by", metavar="KIND", parser_class=_Parser)
    for kind, what in (("text", "QUERY"), ("image", "PATH")):
        sub = kinds.add_parser(kind, parents=[remote], help=f"search by {kind}")
        sub.add_argument("query", metavar=what)
        sub.add_argument("--dataset", required=True)
        sub.add_argument("-k", type=_k, default=5, help="how many results (default 5)")
        sub.add_argument("--offset", type=_non_negative, default=0, help="skip this many ranked results (paging)")
        sub.add_argument("--min-score", type=float, help="leave out results scoring below this cosine")
        sub.add_argument("--autocut", action="store_true", help="stop at the largest drop in score")
        sub.add_argument("--not", dest="exclude", action="append", default=[], metavar="TEXT",
                         help="move away from TEXT (repeatable)")
        sub.add_argument("--prefix", help="only images under this folder of the dataset, e.g. trips/2024/")
        sub.add_argument("--since", type=_moment, help="only images ingested at or after (ISO 8601; local time "
                         "when no zone is given)")
        sub.add_argument("--until", type=_moment, help="only images ingested before (ISO 8601)")
        sub.set_defaults(run=_with_client(search_commands.search), kind=kind)

    duplicates = commands.add_parser("duplicates", parents=[remote], help="groups of near-duplicate images")
    duplicates.add_argument("--dataset", required=True)
    duplicates.add_argument("--min-score", type=float, default=0.95, help="cosine at or above which images "
                            "are duplicates (default 0.95)")
    duplicates.set_defaults(run=_with_client(search_commands.duplicates))

    commands.add_parser("datasets", parents=[remote], help="list datasets") \
        .set_defaults(run=_with_client(search_commands.list_datasets))
    dataset = commands.add_parser("dataset", help="show or delete one dataset")
    dataset_commands = dataset.add_subparsers(title="dataset commands", metavar="COMMAND", parser_class=_Parser)
    show = dataset_commands.add_parser("show", parents=[remote], help="counts and recent failures")
    show.add_argument("name")
    show.set_defaults(run=_with_client(search_commands.show_dataset))
    delete = dataset_commands.add_parser("delete", parents=[remote], help="delete a dataset and its images")
    delete.add_argument("name")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    delete.add_argument("--no-wait", action="store_true", help="return once the deletion is accepted")
    delete.add_argument("--timeout", type=float, default=3600, help="seconds to wait for it to finish (default 3600)")
    delete.set_defaults(run=_with_client(search_commands.delete_dataset))

    sync = commands.add_parser("sync", parents=[remote], help="index what the bucket holds but the catalog lacks")
    sync.add_argument("--dataset", required=True)
    sync.add_argument("--timeout", type=float, default=1800)
    sync.set_defaults(run=_with_client(ingest_commands.sync))

    export = commands.add_parser("export-model", parents=[remote], help="export a CLIP model (python -m model_export)")
    source = export.add_mutually_exclusive_group()
    source.add_argument("--model", default="openai/clip-vit-base-patch32", help="Hugging Face id or local checkpoint")
    source.add_argument("--random-arch", choices=("tiny", "vit-b-32"), help="random weights (offline stand-in)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--quantize", choices=("none", "int8"), default="none")
    export.add_argument("--out", required=True)
    export.add_argument("--force", action="store_true")
    export.add_argument("--publish", action="store_true", help="upload to the stack's bucket under models/<id>/")
    export.set_defaults(run=lambda args: maintenance.export_model(args, _client_factory(args)))

    evaluation = commands.add_parser("evaluate", parents=[remote], help="Precision@1/@5 and self-retrieval Hits@1/@5")
    evaluation.add_argument("--dataset", required=True)
    evaluation.add_argument("--queries", required=True, help="folder of query images labelled by file-name prefix")
    evaluation.set_defaults(run=_with_client(evaluate.evaluate))

    ui = commands.add_parser("ui", parents=[remote], help="serve the search page on 127.0.0.1 (proxies the API)")
    ui.add_argument("--port", type=_non_negative, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free)")
    ui.set_defaults(run=_serve_ui)

    migrate = commands.add_parser("migrate", parents=[common], help="apply the catalog's database migrations")
    migrate.add_argument("--database-url", help="default $CLIPSEARCH_DATABASE_URL, else the secret named by "
                         "$CLIPSEARCH_DB_SECRET_ARN, else the local stack's")
    migrate.set_defaults(run=maintenance.migrate)
    return parser


def _serve_ui(args: argparse.Namespace) -> int:
    from clipsearch_tools.ui.command import serve

    return serve(args)


def _client_factory(args: argparse.Namespace) -> Callable:
    def build():
        from clipsearch_tools.client import ClipsearchClient, resolve_target

        return ClipsearchClient(resolve_target(args.api_url, args.bucket, args.home))

    return build


if __name__ == "__main__":
    sys.exit(main())
