"""`clipsearch ingest` of awkward file names on the local stack: each file lands under the key S3 would give it
or is refused with its reason, and search shows the file's real path.

SeaweedFS (the local object store) rewrites `\\` and `//` to `/`, refuses `.`/`..` and parts over 255 bytes
and takes keys over 1,024 bytes; clipsearch_tools.object_keys gives both stores the same keys.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
import urllib.request
from pathlib import Path

import pytest
from clipsearch.aws import aws_client

pytestmark = pytest.mark.e2e

CLIPSEARCH = Path(sys.executable).parent / "clipsearch"
DATASET = "names"
NFC_CAFE = unicodedata.normalize("NFC", "café.jpeg")
NFD_CAFE = unicodedata.normalize("NFD", "café.jpeg")
LONGEST_NAME = "n" * 250 + ".jpeg"  # 255 bytes: the longest part SeaweedFS holds, and ext4 too
# With "datasets/names/", a key of S3's longest: 1,024 bytes.
EXACTLY_1024_BYTES = ("f" * 200 + "/") * 4 + "f" * 198 + "/x.jpeg"
STORED = {  # relative path on disk -> its key's path in the dataset
    "plain.jpeg": "plain.jpeg",
    "100% sure + q?#;&.jpeg": "100% sure + q?#;&.jpeg",
    "sub dir/trail .jpeg": "sub dir/trail .jpeg",
    NFC_CAFE: NFC_CAFE,
    LONGEST_NAME: LONGEST_NAME,
    EXACTLY_1024_BYTES: EXACTLY_1024_BYTES,
}
OVER_1024_BYTES = "d" * 200 + "/" + ("e" * 200 + "/") * 4 + "x.jpeg"
REFUSED = {  # relative path on disk (bytes: some are not UTF-8) -> a part of the reason
    b"back\\slash.jpeg": "backslash",
    b"line\nbreak.jpeg": "control character",
    b"latin1-\xe9t\xe9.jpeg": "not valid UTF-8",
    NFD_CAFE.encode(): "differ only in Unicode normalization",
    OVER_1024_BYTES.encode(): "over S3's limit of 1024",
}


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "CLIPSEARCH_HOME": str(home)}
    for name in ("CLIPSEARCH_API_URL", "CLIPSEARCH_BUCKET"):
        env.pop(name, None)
    return env


def _run(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLIPSEARCH), *args], env=_env(home), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir: Path):
    home = tmp_path_factory.mktemp("names-home")
    started = _run(home, "local", "up", "--model-dir", str(tiny_model_dir), "--json")
    assert started.returncode == 0, started.stderr
    try:
        yield home
    finally:
        stopped = _run(home, "local", "down")
        assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="module")
def folder(tmp_path_factory, seed_eval_photos: list[Path]) -> Path:
    """One distinct photo per file, so each one's image query finds it first."""
    folder = tmp_path_factory.mktemp("awkward")
    relatives = [os.fsencode(name) for name in STORED] + list(REFUSED)
    for relative, photo in zip(relatives, seed_eval_photos, strict=False):
        path = os.path.join(os.fsencode(folder), relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(photo, path)
    return folder


def test_each_awkward_name_is_stored_under_its_s3_key_or_refused_with_its_reason(home: Path, folder: Path):
    result = _run(home, "ingest", str(folder), "--dataset", DATASET, "--json", "--timeout", "120")
    assert result.returncode == 3, result.stderr  # refused files make the run incomplete
    report = json.loads(result.stdout)
    assert (report["found"], report["uploaded"], report["indexed"]) == (len(STORED) + len(REFUSED), len(STORED),
                                                                         len(STORED))
    refused = {item["path"]: item["reason"] for item in report["refused"]}
    assert len(refused) == len(REFUSED)
    for relative, reason in REFUSED.items():
        shown = os.fsdecode(os.path.join(os.fsencode(folder), relative))
        shown = shown.encode("utf-8", "surrogateescape").decode("utf-8", "replace").replace("\n", "\\n")
        assert reason in refused[shown], (shown, refused[shown])

    state = json.loads((home / "state.json").read_text())
    s3 = aws_client("s3", state["region"], state["s3_endpoint_url"], state["access_key_id"],
                    state["secret_access_key"])
    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=state["bucket"],
                                                          Prefix=f"datasets/{DATASET}/")["Contents"]]
    assert sorted(listed) == sorted(f"datasets/{DATASET}/{path}" for path in STORED.values())


def test_search_shows_each_files_real_path(home: Path, folder: Path):
    state = json.loads((home / "state.json").read_text())
    for relative, key_path in STORED.items():
        key = f"datasets/{DATASET}/{key_path}"
        request = urllib.request.Request(
            f"{state['api_url']}/datasets/{DATASET}/search/image",
            data=json.dumps({"key": key, "k": 1}).encode(), headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            best = json.load(response)["results"][0]
        assert best["key"] == key
        assert best["path"] == str((folder / relative).resolve())  # decoded, not percent-encoded


def test_reingest_finds_every_stored_name_unchanged(home: Path, folder: Path):
    result = _run(home, "ingest", str(folder), "--dataset", DATASET, "--json", "--timeout", "60")
    report = json.loads(result.stdout)
    assert (report["uploaded"], report["skipped"], len(report["refused"])) == (0, len(STORED), len(REFUSED))
