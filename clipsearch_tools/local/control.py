"""Start, stop and inspect the local stack's background supervisor from another process (the CLI)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from clipsearch.errors import ClipsearchError
from clipsearch_tools.local.postgres import PostgresCluster, find_bin_dir
from clipsearch_tools.local.functions import remove_abandoned_cgroups
from clipsearch_tools.local.seaweed import is_server_for
from clipsearch_tools.local.state import StackState, command_line, pid_alive

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"  # the repository's, beside clipsearch_tools/


class LocalStackError(ClipsearchError):
    """The local stack did not start or stop, or is not running."""


def running_state(home: Path) -> StackState | None:
    """The state of a live supervisor in `home`, else None."""
    state = StackState.read(home)
    if state is None or state.status in ("stopped", "failed") or not pid_alive(state.pid):
        return None
    return state


def start_stack(home: Path, model_dir: Path, template: Path, timeout: float = 180,
                preprocess_concurrency: int | None = None, onnx_threads: int | None = None) -> StackState:
    """Starts the supervisor in the background and returns once it is ready (or raises, naming the log).

    `preprocess_concurrency` and `onnx_threads` default to the supervisor's (see clipsearch_tools.local.stack).
    """
    state = running_state(home)
    if state is not None and state.status == "ready":
        return state
    if state is not None:
        raise LocalStackError(f"a local stack is already {state.status} in {home} (pid {state.pid})")
    stop_leftovers(home)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    log_file = home / "logs" / "stack.log"
    StackState.path(home).unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "clipsearch_tools.local.stack",
        "--home", str(home), "--model-dir", str(model_dir), "--template", str(template),
    ]
    if preprocess_concurrency is not None:
        command += ["--preprocess-concurrency", str(preprocess_concurrency)]
    if onnx_threads is not None:
        command += ["--onnx-threads", str(onnx_threads)]
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # survives the terminal that ran `up`; `down` stops it
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = StackState.read(home)
        if state is not None and state.pid == process.pid:
            if state.status == "ready":
                return state
            if state.status == "failed":
                process.wait(60)
                raise LocalStackError(f"the local stack failed to start: {state.error} (log: {log_file})")
        if process.poll() is not None:
            raise LocalStackError(
                f"the local stack exited during start with status {process.returncode} (log: {log_file})"
            )
        time.sleep(0.2)
    _stop_supervisor(process.pid, 60)
    raise LocalStackError(f"the local stack was not ready after {timeout:.0f} s (log: {log_file})")


def stop_stack(home: Path, timeout: float = 120) -> bool:
    """Stops the stack in `home`; False when nothing was running. Never leaves its PostgreSQL behind."""
    state = StackState.read(home)
    was_running = state is not None and pid_alive(state.pid) and state.status not in ("stopped", "failed")
    if was_running:
        _stop_supervisor(state.pid, timeout)
    stop_leftovers(home)  # a supervisor that was killed stopped none of its parts
    if state is not None and state.status != "stopped":
        state.status = "stopped"
        state.write()
    return was_running


def stop_leftovers(home: Path, timeout: float = 30) -> None:
    """Stops what a supervisor killed without its cleanup left in `home`, found from the home's state file.

    Each recorded process is stopped only while it still runs that part's command for this home: a
    pid the system gave to an unrelated process since is left alone. Does nothing while the supervisor lives.
    """
    state = StackState.read(home)
    if state is None or pid_alive(state.pid):
        return
    object_storage = state.parts.get("object_storage")
    if object_storage and is_server_for(command_line(object_storage), home / "objects"):
        logger.info("stopping SeaweedFS (pid %d) left by a supervisor that was killed", object_storage)
        _stop_process(object_storage, timeout)
    if state.postgres_data_dir:
        _stop_orphan_postgres(Path(state.postgres_data_dir))
    for group in remove_abandoned_cgroups(state.pid):
        logger.info("removed the cgroup %s left by a supervisor that was killed", group)


def _terminated(pid: int, timeout: float) -> bool:
    """Sends SIGTERM and waits up to `timeout` for `pid` to exit (or be left a zombie); False if it still runs."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _stop_process(pid: int, timeout: float) -> None:
    if _terminated(pid, timeout):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while pid_alive(pid):
        time.sleep(0.1)


def _stop_supervisor(pid: int, timeout: float) -> None:
    if _terminated(pid, timeout):
        return
    logger.warning("the supervisor (pid %d) did not stop in %.0f s: killing its process group", pid, timeout)
    os.killpg(pid, signal.SIGKILL)  # the supervisor leads its own session: this is exactly what it started


def _stop_orphan_postgres(data_dir: Path) -> None:
    if not data_dir.exists():
        return
    cluster = PostgresCluster(data_dir, 0, find_bin_dir())
    if cluster.is_running():
        cluster.stop()


def probe_parts(state: StackState) -> dict[str, dict]:
    """Each part of a running stack, checked live: {"part": {"ok": bool, "detail": str, ...}}."""
    import psycopg
    from botocore.exceptions import BotoCoreError, ClientError

    from clipsearch.aws import aws_client

    parts: dict[str, dict] = {"supervisor": {"ok": pid_alive(state.pid), "detail": f"pid {state.pid}"}}
    keys = (state.access_key_id, state.secret_access_key)
    try:
        aws_client("s3", state.region, state.s3_endpoint_url, *keys).head_bucket(Bucket=state.bucket)
        parts["object_storage"] = {"ok": True, "detail": f"{state.s3_endpoint_url} bucket {state.bucket}"}
    except (BotoCoreError, ClientError) as error:
        parts["object_storage"] = {"ok": False, "detail": f"{state.s3_endpoint_url}: {error}"}
    try:
        sqs = aws_client("sqs", state.region, state.sqs_endpoint_url, *keys)
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"]
        queue = sqs.get_queue_attributes(QueueUrl=state.queue_url, AttributeNames=names)["Attributes"]
        dead = sqs.get_queue_attributes(
            QueueUrl=state.dead_letter_queue_url, AttributeNames=["ApproximateNumberOfMessages"]
        )["Attributes"] if state.dead_letter_queue_url else {}
        counts = {"waiting": int(queue[names[0]]), "in_flight": int(queue[names[1]]),
                  "dead_letters": int(dead.get("ApproximateNumberOfMessages", 0))}
        parts["queue"] = {"ok": True, "detail": f"{state.queue_url} " + ", ".join(f"{k} {v}" for k, v in counts.items()),
                          **counts}
    except (BotoCoreError, ClientError) as error:
        parts["queue"] = {"ok": False, "detail": f"{state.queue_url}: {error}"}
    try:
        with psycopg.connect(state.database_url, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
        parts["postgres"] = {"ok": True, "detail": _without_password(state.database_url)}
    except psycopg.Error as error:
        parts["postgres"] = {"ok": False, "detail": f"{_without_password(state.database_url)}: {error}"}
    parts["api"] = _probe_api(state.api_url)
    note = " (RANDOM weights: results are not semantic)" if state.model_random_weights else ""
    parts["model"] = {"ok": True, "detail": f"{state.model_id}{note}", "random_weights": state.model_random_weights}
    return parts


def _probe_api(api_url: str | None) -> dict:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{api_url}/openapi.json", timeout=30) as response:
            return {"ok": response.status == 200, "detail": api_url}
    except (urllib.error.URLError, OSError) as error:
        return {"ok": False, "detail": f"{api_url}: {error}"}


def _without_password(url: str | None) -> str:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    if not url:
        return ""
    params = conninfo_to_dict(url)
    if "password" in params:
        params["password"] = "***"
        return make_conninfo(**params)
    return url
