"""`clipsearch search`, `datasets`, `dataset show|delete`: the HTTP API as commands."""

from __future__ import annotations

import argparse
import mimetypes
import sys
import time
from pathlib import Path

from clipsearch.errors import ClipsearchError
from clipsearch_tools.cli.output import emit_json, note, random_weights_note, table
from clipsearch_tools.client import ApiError, ClipsearchClient, read_image

DELETION_POLL_SECONDS = 1.0


def search(args: argparse.Namespace, client: ClipsearchClient) -> int:
    refinements = {
        "offset": args.offset, "min_score": args.min_score, "autocut": args.autocut, "prefix": args.prefix,
        "since": args.since.isoformat() if args.since else None,
        "until": args.until.isoformat() if args.until else None,
    }
    if args.kind == "text":
        response = client.search_text(args.dataset, args.query, args.k, refinements, args.exclude)
    else:
        path = Path(args.query)
        image = read_image(path)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not content_type.startswith("image/"):
            raise ClipsearchError(f"{path} does not look like an image file (by its name)")
        response = client.search_image(args.dataset, image, content_type, args.k, refinements, args.exclude)
    if client.model_has_random_weights(response["model"]):
        note(random_weights_note(response["model"]))
    if args.json:
        emit_json(response)
        return 0
    if not response["results"]:
        narrowed = args.offset or args.min_score is not None or args.autocut or args.prefix or args.since or args.until
        print("no results: nothing matches these options" if narrowed
              else f"no results: dataset {args.dataset} has no indexed images yet")
        return 0
    table(["rank", "score", "path"],
          [[hit["rank"], f"{hit['score']:.4f}", hit["path"]] for hit in response["results"]], right=(0, 1))
    if len(response["results"]) == args.k:
        note(f"more: --offset {args.offset + args.k}")
    return 0


def duplicates(args: argparse.Namespace, client: ClipsearchClient) -> int:
    response = client.duplicates(args.dataset, args.min_score)
    if args.json:
        emit_json(response)
        return 0
    if not response["groups"]:
        print(f"no duplicates in dataset {args.dataset} at min score {response['min_score']}")
        return 0
    for number, group in enumerate(response["groups"], start=1):
        print(f"group {number}: {len(group['images'])} images")
        table(["score", "path"], [[f"{image['score']:.4f}", image["path"]] for image in group["images"]], right=(0,))
    return 0


def list_datasets(args: argparse.Namespace, client: ClipsearchClient) -> int:
    datasets = client.list_datasets()
    if args.json:
        emit_json({"datasets": datasets})
    elif not datasets:
        print("no datasets yet: clipsearch ingest DIR --dataset NAME")
    else:
        table(["dataset", "indexed", "pending", "failed", "model"],
              [[item["name"], item["counts"].get("indexed", 0), item["counts"].get("pending", 0),
                item["counts"].get("failed", 0), item["model"]] for item in datasets], right=(1, 2, 3))
    return 0


def show_dataset(args: argparse.Namespace, client: ClipsearchClient) -> int:
    dataset = client.get_dataset(args.name)
    if args.json:
        emit_json(dataset)
        return 0
    counts = ", ".join(f"{count} {status}" for status, count in dataset["counts"].items())
    print(f"dataset {dataset['name']}: {counts}")
    print(f"model {dataset['model']}, index version {dataset['index_version']}, updated {dataset['updated_at']}")
    if dataset.get("deletion"):
        deletion = dataset["deletion"]
        print(f"being deleted since {deletion['requested_at']}: {deletion['objects_deleted']} objects and "
              f"{deletion['rows_deleted']} catalog rows removed so far")
    for failure in dataset.get("recent_failures", []):
        print(f"  failed: {failure['key']}: {failure['reason']}")
    return 0


def delete_dataset(args: argparse.Namespace, client: ClipsearchClient) -> int:
    if not args.yes:
        if not sys.stdin.isatty():
            raise ClipsearchError(f"refusing to delete dataset {args.name!r} without confirmation: add --yes")
        answer = input(f"Delete dataset {args.name!r}, its index and all its images from the bucket? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    accepted = client.delete_dataset(args.name)
    if args.no_wait:
        if args.json:
            emit_json(accepted)
        else:
            print(f"dataset {args.name} is being deleted; follow it with: clipsearch dataset show {args.name}")
        return 0
    last_seen = _wait_until_gone(client, args.name, accepted["deletion"], args.timeout)
    if args.json:  # the counts stop at the last poll: the worker's final pages leave no row to read them from
        emit_json({"dataset": args.name, "status": "deleted", "last_progress": last_seen})
    else:
        print(f"deleted dataset {args.name}: its images, thumbnails, segments and catalog rows")
    return 0


def _wait_until_gone(client: ClipsearchClient, name: str, deletion: dict, timeout: float) -> dict:
    """Polls the dataset until it is gone, noting progress on stderr; returns the last progress seen."""
    deadline, shown = time.monotonic() + timeout, None
    while True:
        progress = (deletion["objects_deleted"], deletion["rows_deleted"])
        if progress != shown:
            note(f"deleting {name}: {progress[0]} objects and {progress[1]} catalog rows removed so far")
            shown = progress
        if time.monotonic() > deadline:
            raise ClipsearchError(f"dataset {name!r} is still being deleted after {timeout:g} s; it goes on in the "
                                  f"background (clipsearch dataset show {name})")
        time.sleep(DELETION_POLL_SECONDS)
        try:
            current = client.get_dataset(name)
        except ApiError as error:
            if error.status == 404:
                return deletion
            raise
        if current.get("status") != "deleting":  # gone, and an upload that waited began a new one
            return deletion
        deletion = current["deletion"]
