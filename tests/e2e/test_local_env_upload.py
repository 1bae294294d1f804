"""Uploading with any S3 tool: `clipsearch local env`, then boto3 alone puts a folder, then the HTTP API finds it."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

CLIPSEARCH = Path(sys.executable).parent / "clipsearch"
DATASET = "uploaded"

# A user's own script: it knows nothing of clipsearch, only the variables `clipsearch local env` printed.
UPLOADER = textwrap.dedent('''
    import os
    import pathlib
    import sys

    import boto3

    folder = pathlib.Path(sys.argv[1])
    s3 = boto3.client("s3")
    for path in sorted(folder.rglob("*.jpeg")):
        key = f"datasets/{sys.argv[2]}/{path.relative_to(folder).as_posix()}"
        s3.upload_file(str(path), os.environ["CLIPSEARCH_BUCKET"], key)
''')


@pytest.fixture(scope="module")
def stack_home(tmp_path_factory, tiny_model_dir: Path):
    home = tmp_path_factory.mktemp("env-stack-home")
    environment = {**os.environ, "CLIPSEARCH_HOME": str(home)}
    started = subprocess.run([str(CLIPSEARCH), "local", "up", "--model-dir", str(tiny_model_dir)], env=environment,
                             capture_output=True, text=True, timeout=400, check=False)
    assert started.returncode == 0, started.stderr
    try:
        yield home
    finally:
        stopped = subprocess.run([str(CLIPSEARCH), "local", "down"], env=environment, capture_output=True, text=True,
                                 timeout=200, check=False)
        assert stopped.returncode == 0, stopped.stderr


def _exports(line: str) -> dict[str, str]:
    words = shlex.split(line)
    assert words[0] == "export"
    return dict(word.split("=", 1) for word in words[1:])


def test_a_folder_uploaded_with_boto3_from_local_env_becomes_searchable(stack_home: Path, seed_eval_dir: Path,
                                                                        tmp_path: Path):
    printed = subprocess.run([str(CLIPSEARCH), "local", "env"], env={**os.environ, "CLIPSEARCH_HOME": str(stack_home)},
                             capture_output=True, text=True, timeout=60, check=False)
    assert printed.returncode == 0, printed.stderr
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 1
    variables = _exports(lines[0])
    assert set(variables) == {"AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                              "AWS_DEFAULT_REGION", "CLIPSEARCH_BUCKET"}
    assert variables["AWS_ENDPOINT_URL_S3"].startswith("http://127.0.0.1:")

    folder = tmp_path / "holiday"
    (folder / "day2").mkdir(parents=True)
    photos = sorted((seed_eval_dir / "train").glob("*.jpeg"))[:12]
    for index, photo in enumerate(photos):
        shutil.copy(photo, (folder / "day2" if index % 2 else folder) / photo.name)
    script = tmp_path / "upload.py"
    script.write_text(UPLOADER)
    nowhere = str(tmp_path / "no-aws-config")
    uploaded = subprocess.run(
        [sys.executable, str(script), str(folder), DATASET],
        env={"PATH": "/usr/bin:/bin", "AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere, **variables},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert uploaded.returncode == 0, uploaded.stderr

    api_url = json.loads((stack_home / "state.json").read_text())["api_url"]
    deadline = time.monotonic() + 120
    while True:
        dataset = _get(f"{api_url}/datasets/{DATASET}")
        if dataset and dataset["counts"].get("indexed", 0) == len(photos):
            break
        assert time.monotonic() < deadline, f"not all {len(photos)} uploads were indexed after 120 s: {dataset}"
        time.sleep(1)
    query = photos[1]  # uploaded as day2/<name>
    request = urllib.request.Request(f"{api_url}/datasets/{DATASET}/search/image?k=1", data=query.read_bytes(),
                                     method="POST", headers={"content-type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        found = json.loads(answer.read())
    assert found["results"][0]["key"] == f"datasets/{DATASET}/day2/{query.name}"
    assert found["results"][0]["score"] > 0.999


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as error:
        if error.code == 404:  # the dataset exists once its first image is indexed
            return None
        raise
