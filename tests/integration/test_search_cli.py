"""`clipsearch search` options and `clipsearch duplicates` over HTTP: the local gateway with the template's routes
in front of the real search and dataset handlers (PostgreSQL, the S3 endpoint, the tiny model)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from clipsearch_tools.cli import main
from clipsearch_tools.local.gateway import LocalGateway
from clipsearch_tools.local.template import load_template
from http_events import LambdaContext
from search_stack import SearchStack, stack_fixture  # noqa: F401  (the `stack` fixture)
from test_search_refinements import DATASET, index_files, relative

pytestmark = pytest.mark.integration

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"


@pytest.fixture
def api_url(stack: SearchStack, aws_endpoint_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    functions = {"SearchFunction": stack.search, "DatasetsFunction": stack.datasets}
    routes = [route for route in load_template(TEMPLATE).routes if route.function.logical_id in functions]
    gateway = LocalGateway(
        routes, lambda function, event: functions[function.logical_id].handler(event, LambdaContext())
    )
    gateway.start()
    # The CLI reads the model's manifest from the bucket: botocore's endpoint setting keeps it on the test endpoint.
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_endpoint_url)
    yield gateway.url
    gateway.stop()


def clipsearch(capsys: pytest.CaptureFixture, stack: SearchStack, api_url: str, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main([*argv, "--api-url", api_url, "--bucket", stack.store.bucket])
    # The handlers run in this process and write one-line JSON logs and metrics to the same stdout; the
    # CLI's JSON is indented (its first line is "{" alone): keep only the CLI's output.
    lines = capsys.readouterr().out.splitlines(keepends=True)
    return code, "".join(line for line in lines if not line.startswith('{"'))


def search_json(capsys, stack, api_url, *argv: str) -> list[str]:
    code, out = clipsearch(capsys, stack, api_url, "search", *argv, "--dataset", DATASET, "--json")
    assert code == 0, out
    return [hit["key"] for hit in json.loads(out)["results"]]


def test_search_options_page_exclude_and_filter(
    stack: SearchStack, api_url: str, capsys, seed_eval_photos: list[Path]
) -> None:
    photos = seed_eval_photos[:10]
    index_files(stack, {f"home/{photo.name}": photo.read_bytes() for photo in photos[:6]})
    between = datetime.now(timezone.utc)
    index_files(stack, {f"trips/{photo.name}": photo.read_bytes() for photo in photos[6:]})

    everything = search_json(capsys, stack, api_url, "text", "a harbour", "-k", "10")
    second_page = search_json(capsys, stack, api_url, "text", "a harbour", "-k", "3", "--offset", "3")
    in_trips = search_json(capsys, stack, api_url, "text", "a harbour", "-k", "10", "--prefix", "trips/")
    recent = search_json(capsys, stack, api_url, "text", "a harbour", "-k", "10", "--since", between.isoformat())
    older = search_json(capsys, stack, api_url, "text", "a harbour", "-k", "10", "--until", between.isoformat())
    _, excluded = stack.call(stack.search, "search_text", dataset=DATASET, body={
        "terms": [{"text": "a harbour", "weight": 1}, {"text": "boats", "weight": -0.5},
                  {"text": "people", "weight": -0.5}], "k": 10})
    cli_excluded = search_json(
        capsys, stack, api_url, "text", "a harbour", "-k", "10", "--not", "boats", "--not", "people"
    )
    by_image = search_json(
        capsys, stack, api_url, "image", str(photos[7]), "-k", "2", "--not", "a dog", "--prefix", "trips/"
    )
    code, table = clipsearch(
        capsys, stack, api_url, "search", "text", "a harbour", "--dataset", DATASET, "-k", "4", "--min-score", "-1"
    )

    assert second_page == everything[3:6]
    assert in_trips == [key for key in everything if relative(key).startswith("trips/")]
    assert recent == in_trips and older == [key for key in everything if relative(key).startswith("home/")]
    assert cli_excluded == [hit["key"] for hit in excluded["results"]]
    assert by_image[0] == f"datasets/{DATASET}/trips/{photos[7].name}" and len(by_image) == 2
    assert code == 0 and table.splitlines()[0].split() == ["rank", "score", "path"] and len(table.splitlines()) == 5


def test_duplicates_prints_groups_and_bad_values_are_one_line(
    stack: SearchStack, api_url: str, capsys, seed_eval_photos: list[Path]
) -> None:
    photos = seed_eval_photos[:4]
    index_files(stack, {**{photo.name: photo.read_bytes() for photo in photos}, "copy/of-first.jpg": photos[0].read_bytes()})

    code, out = clipsearch(capsys, stack, api_url, "duplicates", "--dataset", DATASET, "--min-score", "0.999")
    json_code, document = clipsearch(capsys, stack, api_url, "duplicates", "--dataset", DATASET, "--json")
    bad_code = main(["duplicates", "--dataset", DATASET, "--min-score", "2", "--api-url", api_url,
                     "--bucket", stack.store.bucket])
    error = capsys.readouterr().err

    assert code == 0 and out.splitlines()[0].startswith("group 1: ")
    assert f"s3://{stack.store.bucket}/datasets/{DATASET}/copy/of-first.jpg" in out
    assert f"s3://{stack.store.bucket}/datasets/{DATASET}/{photos[0].name}" in out
    groups = json.loads(document)["groups"]
    assert json_code == 0 and {f"datasets/{DATASET}/copy/of-first.jpg"} <= {
        image["key"] for group in groups for image in group["images"]
    }
    assert bad_code != 0 and "min_score" in error and len(error.strip().splitlines()) == 1
