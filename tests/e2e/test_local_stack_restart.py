"""A local stack whose supervisor was killed (SIGKILL) comes back with `clipsearch local up`, losing nothing.

`local up` stops what the killed run left (SeaweedFS, PostgreSQL, function instances, their cgroups),
identified from the home's own records, and never a process that merely reused a recorded pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clipsearch_tools.local.control import stop_leftovers, stop_stack
from clipsearch_tools.local.state import StackState, pid_alive

CLIPSEARCH = Path(sys.executable).parent / "clipsearch"
DATASET = "restart"
PHOTOS = 4


def _run(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "CLIPSEARCH_HOME": str(home)}
    for name in ("CLIPSEARCH_API_URL", "CLIPSEARCH_BUCKET"):
        env.pop(name, None)
    return subprocess.run([str(CLIPSEARCH), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def _json(home: Path, *args: str) -> dict:
    result = _run(home, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _wait_dead(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid) or _is_zombie(pid):
            return True
        time.sleep(0.1)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (OSError, IndexError):
        return False


def _cgroups_of(supervisor_pid: int) -> list[Path]:
    return list(Path("/sys/fs/cgroup/memory").rglob(f"clipsearch-{supervisor_pid}-*"))


@pytest.mark.e2e
def test_local_up_after_a_killed_supervisor_stops_its_leftovers_and_keeps_every_image(
    tmp_path: Path, tiny_model_dir: Path, seed_eval_photos: list[Path]
):
    home = tmp_path / "home"
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in seed_eval_photos[:PHOTOS]:
        shutil.copy(photo, photos / photo.name)
    started = _run(home, "local", "up", "--model-dir", str(tiny_model_dir), "--json", timeout=400)
    assert started.returncode == 0, started.stderr
    try:
        report = _json(home, "ingest", str(photos), "--dataset", DATASET, "--timeout", "180")
        assert report["indexed"] == PHOTOS
        killed = StackState.read(home)
        seaweed_pid = killed.parts["object_storage"]
        assert pid_alive(seaweed_pid)
        had_cgroups = bool(_cgroups_of(killed.pid))

        os.kill(killed.pid, signal.SIGKILL)
        assert _wait_dead(killed.pid)
        time.sleep(1)
        assert pid_alive(seaweed_pid) and not _is_zombie(seaweed_pid), "SeaweedFS should outlive its supervisor"

        again = _run(home, "local", "up", "--model-dir", str(tiny_model_dir), "--json", timeout=400)
        assert again.returncode == 0, again.stderr + (home / "logs" / "stack.log").read_text()[-3000:]
        assert not pid_alive(seaweed_pid) or _is_zombie(seaweed_pid)
        restarted = StackState.read(home)
        assert restarted.pid != killed.pid and restarted.status == "ready"
        if had_cgroups:
            assert _cgroups_of(killed.pid) == []

        assert _json(home, "dataset", "show", DATASET)["counts"]["indexed"] == PHOTOS
        for photo in sorted(photos.iterdir()):
            found = _json(home, "search", "image", str(photo), "--dataset", DATASET, "-k", "1")
            assert found["results"][0]["key"] == f"datasets/{DATASET}/{photo.name}"
            assert found["results"][0]["score"] > 0.999
    finally:
        stopped = _run(home, "local", "down")
        assert stopped.returncode == 0, stopped.stderr


def test_a_recorded_pid_now_running_something_else_is_not_killed(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        StackState(
            status="ready", home=str(home), pid=_dead_pid(), log_file=str(home / "stack.log"),
            parts={"object_storage": unrelated.pid, "event_feed": unrelated.pid},
        ).write()
        stop_leftovers(home)
        time.sleep(0.5)
        assert unrelated.poll() is None, "an unrelated process that reused a recorded pid was killed"
    finally:
        unrelated.kill()
        unrelated.wait()


def _dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


def _stand_in_weed(tmp_path: Path, objects: Path) -> subprocess.Popen:
    """A process whose command line reads `weed mini -dir=<objects>` (a Python named weed, sleeping)."""
    weed = tmp_path / "bin" / "weed"
    weed.parent.mkdir(exist_ok=True)
    if not weed.exists():
        weed.symlink_to(sys.executable)
    objects.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([str(weed), "-c", "import time; time.sleep(60)", "mini", f"-dir={objects}"], cwd=objects)


def test_only_the_seaweed_serving_this_home_is_stopped(tmp_path: Path):
    """Same program in another home is not this home's leftover; the one serving this home's objects is."""
    home, other = tmp_path / "home", tmp_path / "other"
    home.mkdir()
    foreign = _stand_in_weed(tmp_path, other / "objects")
    own = _stand_in_weed(tmp_path, home / "objects")
    try:
        StackState(status="ready", home=str(home), pid=_dead_pid(), log_file=str(home / "stack.log"),
                   parts={"object_storage": foreign.pid}).write()
        stop_leftovers(home)
        time.sleep(0.5)
        assert foreign.poll() is None, "a SeaweedFS of another home was killed"
        StackState(status="ready", home=str(home), pid=_dead_pid(), log_file=str(home / "stack.log"),
                   parts={"object_storage": own.pid}).write()
        stop_leftovers(home)
        assert own.wait(10) is not None
    finally:
        for process in (foreign, own):
            process.kill()
            process.wait()


def test_local_down_after_a_killed_supervisor_stops_its_seaweed(tmp_path: Path):
    home = tmp_path / "home"
    home.mkdir()
    leftover = _stand_in_weed(tmp_path, home / "objects")
    try:
        StackState(status="ready", home=str(home), pid=_dead_pid(), log_file=str(home / "stack.log"),
                   parts={"object_storage": leftover.pid}).write()
        assert stop_stack(home) is False  # the supervisor itself was not running
        assert leftover.wait(10) is not None
        assert StackState.read(home).status == "stopped"
    finally:
        leftover.kill()
        leftover.wait()
