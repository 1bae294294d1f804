"""Issue 13's bad-input corpus against one local stack: every hostile request answered with its 4xx, none lost.

Good photos are ingested first. Then each row of corpus() (name, raw HTTP request, expected status and error
code) is sent over its own socket to the stack's HTTP API with a per-request timeout: the answer must carry
the expected status (and code), never a 5xx, must come before the timeout (no hang) and must not be a dropped
connection. Afterwards the stack still answers and every good photo is its own top hit by key query.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest
from clipsearch.aws import aws_client
from clipsearch.search_results import MAX_K, MAX_OFFSET, MAX_PREFIX_CHARS, MAX_TERMS
from PIL import Image
from test_fault_runs import Stack, stack  # noqa: F401  (the `stack` fixture: one local stack for this module)

# The helpers live in other folders' test modules, which pytest puts on sys.path only when it collects them.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from test_image_bombs import blank_png, gif  # noqa: E402  (generated decompression bombs)
from test_local_gateway_http import _read_answer  # noqa: E402  (one HTTP answer read off a raw socket)

pytestmark = pytest.mark.e2e

DATASET = "corpus"
OTHER = "other"
GOOD_PHOTOS = 4
REQUEST_TIMEOUT = 20.0  # seconds per case: longer than the gateway's 10 s read timeout, so a 408 is an answer


@dataclass(frozen=True)
class Case:
    name: str
    request: bytes
    status: int
    code: str | None = None
    half_close: bool = False  # the client shuts its sending side after the request


def http(method: str, path: str, body: bytes = b"", *headers: str, length: bool = True) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def text_search(body: bytes | str | dict, *headers: str, dataset: str = DATASET) -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode("utf-8", errors="surrogatepass")
    return http("POST", f"/datasets/{dataset}/search/text", body, *(headers or ("Content-Type: application/json",)))


def image_search(body: bytes | dict, content_type: str = "application/json", query: str = "") -> bytes:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return http("POST", f"/datasets/{DATASET}/search/image{query}", body, f"Content-Type: {content_type}")


def by_key(key) -> bytes:
    return image_search({"key": key})


def nested(depth: int) -> str:
    return '{"query": ' + "[" * depth + "]" * depth + "}"


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def corpus(photo: bytes) -> list[Case]:
    b64 = base64.b64encode(photo).decode()
    here = f"datasets/{DATASET}"
    cases = [
        # HTTP bodies on the text route
        Case("body: not JSON", text_search("not json"), 400, "invalid_request"),
        Case("body: unterminated object", text_search('{"query": "beach"'), 400, "invalid_request"),
        Case("body: trailing garbage", text_search('{"query": "beach"} x'), 400, "invalid_request"),
        Case("body: empty", text_search(b""), 400, "invalid_request"),
        Case("body: JSON array", text_search("[]"), 400, "invalid_request"),
        Case("body: JSON string", text_search('"beach"'), 400, "invalid_request"),
        Case("body: JSON null", text_search("null"), 400, "invalid_request"),
        Case("body: empty object", text_search({}), 400, "invalid_request"),
        Case("body: not UTF-8", text_search(b'{"query": "\xff\xfe"}'), 400, "invalid_request"),
        Case("body: lone surrogate", text_search('{"query": "\\ud800"}'), 400, "invalid_request"),
        Case("body: nested 1000 deep", text_search(nested(1000)), 400, "invalid_request"),
        Case("body: nested 100000 deep", text_search(nested(100_000)), 400, "invalid_request"),
        Case("body: 2 MB query", text_search({"query": "a" * 2_000_000}), 400, "invalid_request"),
        Case("body: over the gateway's 10 MiB", http("POST", f"/datasets/{DATASET}/search/text", b"",
                                                    "Content-Type: application/json", f"Content-Length: {11 << 20}",
                                                    length=False), 413, "payload_too_large"),
        Case("body: unknown field", text_search({"query": "beach", "admin": True}), 400, "invalid_request"),
        Case("query: a number", text_search({"query": 5}), 400, "invalid_request"),
        Case("query: empty", text_search({"query": ""}), 400, "invalid_request"),
        Case("query: 10001 characters", text_search({"query": "a" * 10_001}), 400, "invalid_request"),
        Case("query: a list", text_search({"query": ["beach"]}), 400, "invalid_request"),
        Case("query and terms together", text_search({"query": "a", "terms": [{"text": "b"}]}), 400),
        Case("k: a string", text_search({"query": "beach", "k": "5"}), 400, "invalid_request"),
        Case("k: 3.0", text_search({"query": "beach", "k": 3.0}), 400, "invalid_request"),
        Case("k: true", text_search({"query": "beach", "k": True}), 400, "invalid_request"),
        Case("k: 0", text_search({"query": "beach", "k": 0}), 400, "invalid_request"),
        Case("k: -1", text_search({"query": "beach", "k": -1}), 400, "invalid_request"),
        Case("k: over the maximum", text_search({"query": "beach", "k": MAX_K + 1}), 400, "invalid_request"),
        Case("k: 10**30", text_search('{"query": "beach", "k": 1000000000000000000000000000000}'), 400,
             "invalid_request"),
        Case("k: 1e999", text_search('{"query": "beach", "k": 1e999}'), 400, "invalid_request"),
        Case("offset: -1", text_search({"query": "beach", "offset": -1}), 400, "invalid_offset"),
        Case("offset: a string", text_search({"query": "beach", "offset": "1"}), 400, "invalid_offset"),
        Case("offset: 1.5", text_search({"query": "beach", "offset": 1.5}), 400, "invalid_offset"),
        Case("offset: over the maximum", text_search({"query": "beach", "offset": MAX_OFFSET + 1}), 400,
             "invalid_offset"),
        Case("min_score: 2", text_search({"query": "beach", "min_score": 2}), 400, "invalid_min_score"),
        Case("min_score: a word", text_search({"query": "beach", "min_score": "high"}), 400, "invalid_min_score"),
        Case("min_score: NaN", text_search('{"query": "beach", "min_score": NaN}'), 400, "invalid_min_score"),
        Case("min_score: -Infinity", text_search('{"query": "beach", "min_score": -Infinity}'), 400,
             "invalid_min_score"),
        Case("autocut: a string", text_search({"query": "beach", "autocut": "yes"}), 400, "invalid_autocut"),
        Case("autocut: 1", text_search({"query": "beach", "autocut": 1}), 400, "invalid_autocut"),
        Case("prefix: too long", text_search({"query": "beach", "prefix": "a" * (MAX_PREFIX_CHARS + 1)}), 400,
             "invalid_prefix"),
        Case("prefix: a number", text_search({"query": "beach", "prefix": 5}), 400, "invalid_prefix"),
        Case("since: a word", text_search({"query": "beach", "since": "yesterday"}), 400, "invalid_since"),
        Case("since: no time zone", text_search({"query": "beach", "since": "2024-01-01T00:00:00"}), 400,
             "invalid_since"),
        Case("until: a number", text_search({"query": "beach", "until": 5}), 400, "invalid_until"),
        Case("since: digits as text", text_search({"query": "beach", "since": "1700000000"}), 400, "invalid_since"),
        Case("terms: empty", text_search({"terms": []}), 400, "invalid_terms"),
        Case("terms: an object", text_search({"terms": {"text": "a"}}), 400, "invalid_terms"),
        Case("terms: an empty term", text_search({"terms": [{}]}), 400, "invalid_terms"),
        Case("terms: two kinds in a term", text_search({"terms": [{"text": "a", "key": f"{here}/a.jpg"}]}), 400,
             "invalid_terms"),
        Case("terms: weight 0", text_search({"terms": [{"text": "a", "weight": 0}]}), 400, "invalid_terms"),
        Case("terms: weight 1e6", text_search({"terms": [{"text": "a", "weight": 1e6}]}), 400, "invalid_terms"),
        Case("terms: too many", text_search({"terms": [{"text": "a"}] * (MAX_TERMS + 1)}), 400, "invalid_terms"),
        Case("terms: unknown field", text_search({"terms": [{"text": "a", "x": 1}]}), 400, "invalid_terms"),
        Case("terms: image not base64", text_search({"terms": [{"image_base64": "%%%"}]}), 400, "invalid_terms"),
        Case("terms: traversal key", text_search({"terms": [{"key": f"{here}/../{OTHER}/a.jpg"}]}), 400,
             "invalid_key"),
        Case("terms: other dataset's key", text_search({"terms": [{"key": f"datasets/{OTHER}/a.jpg"}]}), 400,
             "key_outside_dataset"),
        # headers
        Case("header: text/plain body", text_search({"query": "beach"}, "Content-Type: text/plain"), 415,
             "unsupported_media_type"),
        Case("header: application/xml body", text_search("<q>beach</q>", "Content-Type: application/xml"), 415,
             "unsupported_media_type"),
        Case("header: 40 KB header", text_search({"query": "beach"}, "Content-Type: application/json",
                                                 "X-Big: " + "a" * 40_000), 431, "headers_too_large"),
        Case("header: 2000 small headers",
             text_search({"query": "beach"}, "Content-Type: application/json",
                         *(f"X-H{index}: v" for index in range(2000))), 431, "headers_too_large"),
        Case("header: two different Content-Length",
             http("POST", f"/datasets/{DATASET}/search/text", b'{"query": "beach"}', "Content-Type: application/json",
                  "Content-Length: 2", "Content-Length: 18", length=False), 400),
        Case("header: Content-Length with chunked",
             http("POST", f"/datasets/{DATASET}/search/text", b"0\r\n\r\n", "Content-Type: application/json",
                  "Content-Length: 5", "Transfer-Encoding: chunked", length=False), 400),
        Case("header: a line without a name", text_search({"query": "beach"}, "Content-Type: application/json",
                                                          ": nameless"), 400),
        Case("header: a space before the colon", text_search({"query": "beach"}, "Content-Type : application/json"),
             400),
        Case("header: no Host", b"GET /datasets HTTP/1.1\r\n\r\n", 400),
        Case("header: a NUL in a value", text_search({"query": "beach"}, "Content-Type: application/json",
                                                     "X-Nul: a\x00b"), 400),
        # framing over raw sockets
        Case("framing: Content-Length abc",
             http("POST", f"/datasets/{DATASET}/search/text", b"{}", "Content-Length: abc", length=False), 400),
        Case("framing: Content-Length -1",
             http("POST", f"/datasets/{DATASET}/search/text", b"{}", "Content-Length: -1", length=False), 400),
        Case("framing: Content-Length 1e3",
             http("POST", f"/datasets/{DATASET}/search/text", b"{}", "Content-Length: 1e3", length=False), 400),
        Case("framing: short body, client closed its side",
             http("POST", f"/datasets/{DATASET}/search/text", b'{"query"', "Content-Type: application/json",
                  "Content-Length: 100", length=False), 400, half_close=True),
        Case("framing: short body, client waits",
             http("POST", f"/datasets/{DATASET}/search/text", b'{"query"', "Content-Type: application/json",
                  "Content-Length: 100", length=False), 408, "request_timeout"),
        Case("framing: bad chunk size",
             http("POST", f"/datasets/{DATASET}/search/text", b"zz\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked",
                  length=False), 400),
        Case("framing: TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n", 400),
        Case("framing: no HTTP version", b"GET /datasets\r\n\r\n", 400),
        Case("framing: three-word garbage", b"HELLO THERE FRIEND\r\n\r\n", 400),
        Case("framing: empty request line", b"\r\n\r\n\r\n", 400),
        Case("framing: 20 KB URL", http("GET", "/datasets/" + "a" * 20_000), 431, "headers_too_large"),
        Case("framing: a space in the path", b"GET /datasets/a b HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        Case("framing: unknown method", http("BREW", f"/datasets/{DATASET}"), 404),
        Case("framing: unknown route", http("GET", "/nowhere"), 404),
        Case("framing: text route by GET", http("GET", f"/datasets/{DATASET}/search/text"), 404),
        # dataset names
        Case("name: a dot", http("GET", "/datasets/bad.name"), 400, "invalid_request"),
        Case("name: 64 characters", http("GET", "/datasets/" + "a" * 64), 400, "invalid_request"),
        Case("name: leading dash", http("GET", "/datasets/-photos"), 400, "invalid_request"),
        Case("name: a space", http("GET", "/datasets/a%20b"), 400, "invalid_request"),
        Case("name: non-ASCII", http("GET", "/datasets/" + quote("café")), 400, "invalid_request"),
        Case("name: an encoded slash", http("GET", "/datasets/a%2Fb"), 400, "invalid_request"),
        Case("name: encoded traversal", http("GET", "/datasets/%2E%2E"), 400, "invalid_request"),
        Case("name: unknown", http("GET", "/datasets/nosuchdataset"), 404, "dataset_not_found"),
        Case("name: unknown, search", text_search({"query": "beach"}, dataset="nosuchdataset"), 404,
             "dataset_not_found"),
        Case("name: bad, search", text_search({"query": "beach"}, dataset="bad.name"), 400, "invalid_request"),
        Case("name: bad, delete", http("DELETE", "/datasets/bad.name"), 400, "invalid_request"),
        Case("name: unknown, delete", http("DELETE", "/datasets/nosuchdataset"), 404, "dataset_not_found"),
        Case("name: bad, duplicates", http("GET", "/datasets/bad.name/duplicates"), 400, "invalid_request"),
        Case("duplicates: min_score a word", http("GET", f"/datasets/{DATASET}/duplicates?min_score=abc"), 400),
        # keys on the image route
        Case("key: another dataset's image", by_key(f"datasets/{OTHER}/secret.jpg"), 400, "key_outside_dataset"),
        Case("key: another dataset's missing image", by_key(f"datasets/{OTHER}/missing.jpg"), 400,
             "key_outside_dataset"),
        Case("key: a dataset extending this name", by_key(f"datasets/{DATASET}-x/a.jpg"), 400, "key_outside_dataset"),
        Case("key: outside datasets/", by_key("models/x/manifest.json"), 400, "key_outside_dataset"),
        Case("key: traversal to a private prefix", by_key(f"{here}/../../private/x.jpg"), 400, "invalid_key"),
        Case("key: traversal into another dataset", by_key(f"{here}/../{OTHER}/secret.jpg"), 400, "invalid_key"),
        Case("key: a '.' segment", by_key(f"{here}/./x.jpg"), 400, "invalid_key"),
        Case("key: a NUL byte", by_key(f"{here}/a\x00b.jpg"), 400, "invalid_key"),
        Case("key: a newline", by_key(f"{here}/a\nb.jpg"), 400, "invalid_key"),
        Case("key: a DEL character", by_key(f"{here}/a\x7fb.jpg"), 400, "invalid_key"),
        Case("key: a backslash", by_key(f"{here}\\..\\{OTHER}\\secret.jpg"), 400, "invalid_key"),
        Case("key: an empty segment", by_key(f"{here}//x.jpg"), 400, "invalid_key"),
        Case("key: a leading slash", by_key(f"/{here}/x.jpg"), 400, "invalid_key"),
        Case("key: 1025 bytes", by_key(f"{here}/{'a' * (1025 - len(here) - 5)}.jpg"), 400, "invalid_key"),
        Case("key: 100 KB", by_key(f"{here}/{'a' * 100_000}.jpg"), 400, "invalid_key"),
        Case("key: empty", by_key(""), 400, "invalid_key"),
        Case("key: not an image", by_key(f"{here}/notes.txt"), 400, "invalid_key"),
        Case("key: a number", by_key(5), 400, "invalid_request"),
        Case("key: missing in this dataset", by_key(f"{here}/missing.jpg"), 404, "object_not_found"),
        # images on the image route
        Case("image: truncated JPEG", image_search(photo[: len(photo) // 3], "image/jpeg"), 400, "invalid_image"),
        Case("image: JPEG header only", image_search(photo[:200], "image/jpeg"), 400, "invalid_image"),
        Case("image: zero bytes", image_search(b"", "image/jpeg"), 400),
        Case("image: a text file as JPEG", image_search(b"this is text, not a JPEG\n", "image/jpeg"), 400,
             "invalid_image"),
        Case("image: SVG", image_search(b'<svg xmlns="http://www.w3.org/2000/svg"/>', "image/svg+xml"), 400,
             "invalid_image"),
        Case("image: PNG bomb of 400 MP", image_search(blank_png(20_000, 20_000), "image/png"), 413,
             "image_too_large"),
        Case("image: 16-bit PNG of 30 MP (over the query cap)",
             image_search(blank_png(6_000, 5_000, bit_depth=16), "image/png"), 413, "image_too_large"),
        Case("image: GIF frame of 4 GP", image_search(gif((65_535, 65_535), [(65_535, 65_535)]), "image/gif"), 413,
             "image_too_large"),
        Case("image: animated GIF", image_search(_animated_gif(), "image/gif"), 200),
        Case("image: octet-stream", image_search(photo, "application/octet-stream"), 415, "unsupported_media_type"),
        Case("image: multipart", image_search(photo, "multipart/form-data; boundary=x"), 415,
             "unsupported_media_type"),
        Case("image: base64 not base64", image_search({"image_base64": "%%%not base64"}), 400, "invalid_request"),
        Case("image: base64 of text", image_search({"image_base64": base64.b64encode(b"text").decode()}), 400,
             "invalid_image"),
        Case("image: base64 and key", image_search({"image_base64": b64, "key": f"{here}/a.jpg"}), 400,
             "invalid_request"),
        Case("image: neither base64 nor key", image_search({}), 400, "invalid_request"),
        Case("image: unknown field", image_search({"key": f"{here}/a.jpg", "x": 1}), 400, "invalid_request"),
        Case("image: k in the query is +5", image_search(photo, "image/jpeg", "?k=%2B5"), 400, "invalid_request"),
        Case("image: k in the query is abc", image_search(photo, "image/jpeg", "?k=abc"), 400, "invalid_request"),
        Case("image: offset in the query is -1", image_search(photo, "image/jpeg", "?offset=-1"), 400,
             "invalid_offset"),
        Case("image: min_score in the query is nan", image_search(photo, "image/jpeg", "?min_score=nan"), 400,
             "invalid_min_score"),
        Case("image: since in the query is a word", image_search(photo, "image/jpeg", "?since=soon"), 400,
             "invalid_since"),
        Case("image: until in the query is digits", image_search(photo, "image/jpeg", "?until=5"), 400,
             "invalid_until"),
        Case("image: k in the body is a string", image_search({"image_base64": b64, "k": "3"}), 400,
             "invalid_request"),
    ]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), [name for name, count in Counter(names).items() if count > 1]
    return cases


@dataclass
class Outcome:
    status: int | None  # None: no answer
    code: str | None
    failure: str | None  # 'hang', 'dropped' or a wrong answer; None when as expected
    seconds: float


def send(api_url: str, case: Case) -> Outcome:
    address = urlsplit(api_url)
    started = time.monotonic()
    try:
        with socket.create_connection((address.hostname, address.port), timeout=REQUEST_TIMEOUT) as sock:
            try:
                sock.sendall(case.request)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer and close before reading everything: the answer decides
            if case.half_close:
                sock.shutdown(socket.SHUT_WR)
            answer = _read_answer(sock, bytearray())
    except TimeoutError:
        return Outcome(None, None, "hang", time.monotonic() - started)
    except (AssertionError, ConnectionError) as error:
        return Outcome(None, None, f"dropped ({error.__class__.__name__})", time.monotonic() - started)
    seconds = time.monotonic() - started
    code = _error_code(answer.body)
    if answer.status >= 500:
        failure = f"a {answer.status}: {answer.body[:300]!r}"
    elif answer.status != case.status or (case.code is not None and code != case.code):
        failure = f"expected {case.status} {case.code}, got {answer.status} {code}: {answer.body[:300]!r}"
    elif answer.status >= 400 and not code:
        failure = f"no JSON error code: {answer.body[:300]!r}"
    else:
        failure = None
    return Outcome(answer.status, code, failure, seconds)


def _error_code(body: bytes) -> str | None:
    """The code of the functions' {"error": {"code"}} or of the gateway's {"code"} bodies."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    if not isinstance(document, dict):
        return None
    error = document.get("error")
    return error.get("code") if isinstance(error, dict) else document.get("code")


def search_by_key(api_url: str, key: str, k: int) -> list[dict]:
    body = json.dumps({"key": key, "k": k}).encode()
    raw = http("POST", f"/datasets/{DATASET}/search/image", body, "Content-Type: application/json",
               "Connection: close")
    address = urlsplit(api_url)
    with socket.create_connection((address.hostname, address.port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(raw)
        answer = _read_answer(sock, bytearray())
    assert answer.status == 200, answer.body
    return json.loads(answer.body)["results"]


def test_every_bad_input_is_answered_with_its_4xx_and_the_stack_still_finds_every_photo(
    stack: Stack, tmp_path: Path, seed_eval_photos: list[Path]  # noqa: F811
):
    photos = seed_eval_photos[:GOOD_PHOTOS]
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    ingested = stack.cli("ingest", str(folder), "--dataset", DATASET, "--json", "--timeout", "240")
    assert ingested.returncode == 0, ingested.stderr
    assert json.loads(ingested.stdout)["indexed"] == GOOD_PHOTOS
    s3 = aws_client("s3", stack.state["region"], stack.state["s3_endpoint_url"], stack.state["access_key_id"],
                    stack.state["secret_access_key"])
    s3.put_object(Bucket=stack.state["bucket"], Key=f"datasets/{OTHER}/secret.jpg",
                  Body=seed_eval_photos[GOOD_PHOTOS].read_bytes())
    api_url = stack.state["api_url"]

    cases = corpus(photos[0].read_bytes())
    started = time.monotonic()
    outcomes = {case.name: send(api_url, case) for case in cases}
    took = time.monotonic() - started

    statuses = Counter(outcome.status for outcome in outcomes.values())
    print(f"\nbad-input corpus: {len(cases)} cases in {took:.1f} s, statuses "
          + ", ".join(f"{status}: {count}" for status, count in sorted(statuses.items(), key=str))
          + f"; slowest {max(outcomes.items(), key=lambda item: item[1].seconds)[0]!r} "
          f"{max(outcome.seconds for outcome in outcomes.values()):.1f} s")
    assert len(cases) >= 100
    failures = {name: outcome.failure for name, outcome in outcomes.items() if outcome.failure}
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(
        f"  {name}: {failure}" for name, failure in failures.items())
    log = stack.log()  # the functions' log lines are in it: an unhandled error is logged with its traceback
    assert "unhandled error" not in log and "Traceback" not in log

    for photo in photos:
        key = f"datasets/{DATASET}/{photo.name}"
        results = search_by_key(api_url, key, k=GOOD_PHOTOS)
        assert results[0]["key"] == key and results[0]["score"] > 0.999, (key, results[:2])
        assert sorted(hit["key"] for hit in results) == sorted(f"datasets/{DATASET}/{p.name}" for p in photos)


LOAD_BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def test_50_clients_mixing_text_and_image_queries_during_an_ingest_see_no_error(
    stack: Stack, tmp_path: Path, seed_eval_photos: list[Path]  # noqa: F811
):
    """The issue's load target, kept short here (benchmarks/load.py runs the long one): only 200s, or 429/503
    that carry Retry-After, and no connection error, while another dataset is ingested."""
    photos = seed_eval_photos[:GOOD_PHOTOS]
    folder = tmp_path / "queried"
    folder.mkdir()
    for photo in photos:
        shutil.copy(photo, folder / photo.name)
    ingested = stack.cli("ingest", str(folder), "--dataset", "loaded", "--json", "--timeout", "240")
    assert ingested.returncode == 0, ingested.stderr
    during = tmp_path / "during"
    during.mkdir()
    for photo in seed_eval_photos[GOOD_PHOTOS:GOOD_PHOTOS + 12]:
        shutil.copy(photo, during / photo.name)

    run = subprocess.run(
        [sys.executable, str(LOAD_BENCHMARK), "--dataset", "loaded", "--clients", "50", "--seconds", "10",
         "--warmup", "3", "--image-share", "0.3", "--image", str(photos[0]), "--ingest", str(during),
         "--home", str(stack.home), "--json"],
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL, check=False,
        env={**os.environ, "CLIPSEARCH_HOME": str(stack.home)},
    )
    assert run.stdout.strip(), run.stderr
    summary = json.loads(run.stdout)
    print(f"\nload: {summary['requests']} requests, {summary['requests_per_second']}/s, latency {summary['latency_ms']}, "
          f"statuses {summary['statuses']}, connection errors {summary['connection_errors']}")
    assert summary["connection_errors"] == {}, summary
    throttled = sum(count for status, count in summary["statuses"].items() if status in ("429", "503"))
    assert set(summary["statuses"]) <= {"200", "429", "503"}, summary["statuses"]
    assert summary["throttled_with_retry_after"] == throttled and summary["statuses"].get("200", 0) > 0
    assert summary["ingest"]["indexed"] == 12, summary["ingest"]
