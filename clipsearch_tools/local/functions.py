"""The functions of template.yaml run as warm child processes under Lambda's limits, one event at a time each.

Each function gets execution environments (`FunctionInstance`): a child process started with only
the environment the template gives the function plus what Lambda's runtime sets, its own /tmp
directory (TMPDIR), imported once and reused for one event at a time. The host enforces:
- MemorySize: a hard cap on resident memory, by a cgroup (v1 memory controller) per instance, nested
  under this process's own cgroup; where cgroups are not writable, a watchdog polls the instance's RSS.
  An instance killed for memory fails its invocation as Lambda reports it ("Runtime.OutOfMemory",
  "Runtime exited with error: signal: killed") and is replaced by a new one on the next event.
- Timeout: the instance is killed and the invocation fails with "Task timed out after N.00 seconds".
  The import (init) of a new instance is also bounded by Timeout; Lambda bounds it by 10 s, then
  retries it within the first invocation's Timeout.
- EphemeralStorage: the budget of the instance's /tmp directory, measured while the event runs and
  when it ends. Over budget, the invocation fails and the instance is discarded (Lambda fails the
  write itself with ENOSPC; a directory has no size limit to make a write fail here).
Up to `concurrency[function]` instances of a function run at once (default 1), as Lambda's
reserved concurrency would bound them. Discarded instances lose their /tmp directory and cgroup.
An invocation may name a `slot`: each slot of a function has its own instances (and its own limit),
so a caller that wants an event to find what the previous one of its kind loaded (a shard searcher's
shard) gets the same warm instance back.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from itertools import count
from pathlib import Path

from clipsearch.errors import ClipsearchError
from clipsearch_tools.local.template import Function

logger = logging.getLogger(__name__)
function_logs = logging.getLogger("clipsearch_tools.local.function_logs")

FUNCTION_ARN_PREFIX = "arn:aws:lambda:us-east-1:000000000000:function:"
CGROUP_MEMORY_MOUNT = Path("/sys/fs/cgroup/memory")
_TICK_SECONDS = 0.1  # how often a running invocation's time, memory (watchdog) and /tmp are checked
_TMP_CHECK_SECONDS = 0.5

Environment = Callable[[Function, Path], Mapping[str, str]]


class FunctionError(ClipsearchError):
    """An invocation failed; `error_type` and the message are what Lambda would report."""

    def __init__(self, function_name: str, error_type: str, message: str, stack_trace: list[str] | None = None):
        super().__init__(f"{function_name}: {error_type}: {message}")
        self.function_name = function_name
        self.error_type = error_type
        self.error_message = message
        self.stack_trace = stack_trace or []


def inherited_environment(function: Function, tmp_dir: Path) -> Mapping[str, str]:
    """This process's own environment: for tools that prepared it for one function (`clipsearch sync`)."""
    return dict(os.environ)


def lambda_runtime_environment(function: Function, instance_name: str, tmp_dir: Path) -> dict[str, str]:
    """The variables Lambda's Python runtime sets in every execution environment (local values)."""
    return {
        "AWS_LAMBDA_FUNCTION_NAME": function.logical_id,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(function.memory_size),
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function.logical_id}",
        "AWS_LAMBDA_LOG_STREAM_NAME": instance_name,
        "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12",
        "_HANDLER": function.handler,
        "LAMBDA_TASK_ROOT": str(function.code_uri),
        "LAMBDA_RUNTIME_DIR": str(Path(__file__).parent),
        "TMPDIR": str(tmp_dir),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "en_US.UTF-8",
        "TZ": ":UTC",
        "PYTHONUNBUFFERED": "1",  # logs reach the stack log as they are written, as Lambda's runtime flushes
    }


class MemoryCgroups:
    """Creates one memory-capped cgroup per instance under this process's own memory cgroup."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def create(cls) -> MemoryCgroups | None:
        """None when the cgroup v1 memory controller is absent or not writable (then the RSS watchdog caps)."""
        own = _own_memory_cgroup()
        try:
            if own is None:
                raise OSError("no cgroup v1 memory controller for this process")
            root = own / f"clipsearch-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            root.mkdir()
        except OSError as error:
            logger.warning("memory cgroups unavailable (%s): capping memory with an RSS watchdog", error)
            return None
        return cls(root)

    def instance(self, name: str, limit_bytes: int) -> Path:
        group = self.root / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        try:  # with swap on the machine, count it too: Lambda has none
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit_bytes))
        except OSError:
            pass
        return group

    def remove(self) -> None:
        _remove_cgroup(self.root)


def remove_abandoned_cgroups(owner_pid: int) -> list[Path]:
    """Removes the cgroups a FunctionHost of process `owner_pid` (now dead) left beside this process's own.

    They are named clipsearch-<owner pid>-<random>, one instance group inside each; whatever still
    runs in them was started there by that host, so it is killed first. Returns the groups removed.
    """
    own = _own_memory_cgroup()
    if own is None:
        return []
    removed = []
    for root in sorted(own.glob(f"clipsearch-{owner_pid}-*")):
        for group in [path for path in root.iterdir() if path.is_dir()]:
            _kill_members(group)
            _remove_cgroup(group)
        _remove_cgroup(root)
        if not root.exists():
            removed.append(root)
    return removed


def _own_memory_cgroup() -> Path | None:
    try:
        own = next(line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                   if "memory" in line.split(":", 2)[1].split(","))
    except (OSError, StopIteration, IndexError):
        return None
    return CGROUP_MEMORY_MOUNT / own.lstrip("/")


def _kill_members(group: Path) -> None:
    try:
        members = [int(pid) for pid in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _remove_cgroup(group: Path) -> None:
    for _ in range(50):  # the kernel releases a cgroup a moment after its last process is reaped
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)
    logger.warning("could not remove cgroup %s", group)


def _oom_killed(group: Path) -> bool:
    try:
        for line in (group / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1]) > 0
    except OSError:
        pass
    return False


def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return total


def _directory_bytes(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                continue
    return total


class FunctionInstance:
    """One execution environment: a warm child process serving one event at a time."""

    def __init__(self, function: Function, name: str, directory: Path, environment: Environment,
                 cgroups: MemoryCgroups | None) -> None:
        self.function = function
        self.name = name
        self.directory = directory
        self.tmp_dir = directory / "tmp"
        self._environment = environment
        self._cgroups = cgroups
        self._cgroup: Path | None = None
        self._process: subprocess.Popen | None = None
        self._requests = None
        self._replies_fd: int | None = None
        self._buffer = b""
        self._watchdog_killed = False
        self.healthy = False

    @property
    def memory_limit_bytes(self) -> int:
        return self.function.memory_size * 1024 * 1024

    @property
    def tmp_limit_bytes(self) -> int:
        return self.function.ephemeral_storage * 1024 * 1024

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        """Starts the process and waits until the handler is imported (bounded by the function's Timeout)."""
        self.tmp_dir.mkdir(parents=True)
        environment = {**self._environment(self.function, self.tmp_dir),
                       **lambda_runtime_environment(self.function, self.name, self.tmp_dir)}
        requests_read, requests_write = os.pipe()
        replies_read, replies_write = os.pipe()
        command = [sys.executable, "-m", "clipsearch_tools.local.function_runtime", "--handler", self.function.handler,
                   "--requests-fd", str(requests_read), "--replies-fd", str(replies_write)]
        if self._cgroups is not None:
            self._cgroup = self._cgroups.instance(self.name, self.memory_limit_bytes)
            command += ["--cgroup", str(self._cgroup)]
        try:
            self._process = subprocess.Popen(
                command, env=environment, cwd=self.function.code_uri, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(requests_read, replies_write),
                start_new_session=True,  # its own process group: a kill takes whatever it started too
            )
        finally:
            os.close(requests_read)
            os.close(replies_write)
        self._requests = os.fdopen(requests_write, "w", encoding="utf-8")
        self._replies_fd = replies_read
        threading.Thread(target=self._copy_logs, name=f"logs-{self.name}", daemon=True).start()
        reply = self._await_reply(time.monotonic() + self.function.timeout, "Runtime.InitTimeout",
                                  f"the handler was not imported within {self.function.timeout} seconds")
        if "error" in reply:
            self.discard()
            raise FunctionError(self.function.logical_id, reply["error"]["errorType"],
                                reply["error"]["errorMessage"], reply["error"].get("stackTrace"))
        self.healthy = True
        logger.info("%s: started (pid %d, memory %d MB%s, /tmp %d MB)", self.name, self._process.pid,
                    self.function.memory_size, "" if self._cgroup else " by watchdog", self.function.ephemeral_storage)

    def invoke(self, event: dict) -> object:
        """The handler's answer; raises FunctionError as Lambda would report the failure."""
        request_id = str(uuid.uuid4())
        deadline = time.monotonic() + self.function.timeout
        request = {"event": event, "request_id": request_id, "function_arn": FUNCTION_ARN_PREFIX + self.function.logical_id,
                   "deadline_epoch_ms": int((time.time() + self.function.timeout) * 1000)}
        try:
            self._requests.write(json.dumps(request) + "\n")
            self._requests.flush()
        except OSError:
            pass  # the process is gone: the reply wait below says how it ended
        reply = self._await_reply(deadline, "Sandbox.Timedout",
                                  f"{request_id} Task timed out after {self.function.timeout:.2f} seconds")
        self._check_tmp()
        if "error" in reply:
            error = reply["error"]
            function_logs.error("%s | [ERROR] %s: %s\n%s", self.name, error["errorType"], error["errorMessage"],
                                "".join(error.get("stackTrace") or []))
            raise FunctionError(self.function.logical_id, error["errorType"], error["errorMessage"],
                                error.get("stackTrace"))
        return reply["result"]

    def discard(self) -> None:
        """Kills the process, removes its cgroup and its /tmp directory."""
        self.healthy = False
        if self._process is not None and self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._process.wait(30)
        if self._requests is not None:
            try:
                self._requests.close()
            except OSError:
                pass
            self._requests = None
        if self._replies_fd is not None:
            os.close(self._replies_fd)
            self._replies_fd = None
        if self._cgroup is not None:
            _remove_cgroup(self._cgroup)
            self._cgroup = None
        shutil.rmtree(self.directory, ignore_errors=True)

    def _await_reply(self, deadline: float, timeout_type: str, timeout_message: str) -> dict:
        next_tmp_check = time.monotonic() + _TMP_CHECK_SECONDS
        while b"\n" not in self._buffer:
            now = time.monotonic()
            if now >= deadline:
                self._fail(timeout_type, timeout_message)
            ready, _, _ = select.select([self._replies_fd], [], [], min(_TICK_SECONDS, deadline - now))
            if ready:
                chunk = os.read(self._replies_fd, 1 << 20)
                if not chunk:
                    self._fail_exited()
                self._buffer += chunk
                continue
            if self._cgroup is None and _tree_rss_bytes(self._process.pid) > self.memory_limit_bytes:
                self._watchdog_killed = True
                os.killpg(self._process.pid, signal.SIGKILL)
            if time.monotonic() >= next_tmp_check:
                self._check_tmp()
                next_tmp_check = time.monotonic() + _TMP_CHECK_SECONDS
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def _check_tmp(self) -> None:
        used = _directory_bytes(self.tmp_dir)
        if used > self.tmp_limit_bytes:
            self._fail("Runtime.EphemeralStorageExceeded",
                       f"/tmp holds {used / 2**20:.0f} MB, over the function's EphemeralStorage of "
                       f"{self.function.ephemeral_storage} MB (in Lambda the write fails: No space left on device)")

    def _fail_exited(self):
        self._process.wait(30)
        oom = self._watchdog_killed or (self._cgroup is not None and _oom_killed(self._cgroup))
        code = self._process.returncode
        # Lambda's wording comes from Go: "signal: killed", "signal: segmentation fault", "exit status 1".
        reason = f"signal: {(signal.strsignal(-code) or str(-code)).lower()}" if code < 0 else f"exit status {code}"
        self.discard()
        raise FunctionError(self.function.logical_id, "Runtime.OutOfMemory" if oom else "Runtime.ExitError",
                            f"Runtime exited with error: {reason}")

    def _fail(self, error_type: str, message: str):
        self.discard()
        raise FunctionError(self.function.logical_id, error_type, message)

    def _copy_logs(self) -> None:
        for raw in self._process.stdout:
            function_logs.info("%s | %s", self.name, raw.decode("utf-8", "replace").rstrip("\n"))


class _Pool:
    """A function's instances: idle ones are reused, new ones started up to the concurrency limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.idle: list[FunctionInstance] = []
        self.running = 0
        self.condition = threading.Condition()


class FunctionHost:
    """Runs each function's events on its warm instances; the gateway, queue runner and scheduler share it."""

    def __init__(self, environment: Environment = inherited_environment, runtime_dir: Path | None = None,
                 concurrency: Mapping[str, int] | None = None, memory_cgroups: bool = True) -> None:
        self._environment = environment
        self._owns_runtime_dir = runtime_dir is None
        self._runtime_dir = Path(runtime_dir) if runtime_dir else Path(tempfile.mkdtemp(prefix="clipsearch-functions-"))
        self._concurrency = dict(concurrency or {})
        self._cgroups = MemoryCgroups.create() if memory_cgroups else None
        self._pools: dict[tuple[str, str], _Pool] = {}  # by (function's logical id, slot)
        self._guard = threading.Lock()
        self._numbers = count(1)
        self._stopped = False
        atexit.register(self.stop)  # a tool that never calls stop() leaves no process, cgroup or directory

    def invoke(self, function: Function, event: dict, slot: str = "") -> object:
        instance = self._acquire(function, slot)
        try:
            return instance.invoke(event)
        finally:
            self._release(function, instance, slot)

    def instances(self, function: Function, slot: str = "") -> int:
        """How many instances of `function` (in `slot`) exist now (busy or idle)."""
        pool = self._pool(function, slot)
        with pool.condition:
            return pool.running

    def instance_pids(self, function: Function) -> list[int]:
        """The process ids of `function`'s idle instances, in every slot (for measuring them)."""
        with self._guard:
            pools = [pool for (logical_id, _), pool in self._pools.items() if logical_id == function.logical_id]
        pids = []
        for pool in pools:
            with pool.condition:
                pids += [instance.pid for instance in pool.idle if instance.pid is not None]
        return pids

    def stop(self) -> None:
        """Discards every idle instance; busy ones are discarded as their event ends."""
        with self._guard:
            if self._stopped:
                return
            self._stopped = True
            pools = list(self._pools.values())
        for pool in pools:
            with pool.condition:
                idle, pool.idle = pool.idle, []
                pool.running -= len(idle)
            for instance in idle:
                instance.discard()
        if self._cgroups is not None and not any(pool.running for pool in pools):
            self._cgroups.remove()
        if self._owns_runtime_dir:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)

    def _pool(self, function: Function, slot: str = "") -> _Pool:
        with self._guard:
            if (function.logical_id, slot) not in self._pools:
                limit = max(1, self._concurrency.get(function.logical_id, 1))
                self._pools[(function.logical_id, slot)] = _Pool(limit)
            return self._pools[(function.logical_id, slot)]

    def _acquire(self, function: Function, slot: str = "") -> FunctionInstance:
        pool = self._pool(function, slot)
        with pool.condition:
            while True:
                if self._stopped:
                    raise FunctionError(function.logical_id, "Local.Stopped", "the local stack is stopping")
                if pool.idle:
                    return pool.idle.pop()
                if pool.running < pool.limit:
                    pool.running += 1
                    break
                pool.condition.wait()
        name = f"{function.logical_id}-{slot + '-' if slot else ''}{next(self._numbers)}"
        instance = FunctionInstance(function, name, self._runtime_dir / name, self._environment, self._cgroups)
        try:
            instance.start()
        except BaseException:
            instance.discard()
            with pool.condition:
                pool.running -= 1
                pool.condition.notify()
            raise
        return instance

    def _release(self, function: Function, instance: FunctionInstance, slot: str = "") -> None:
        pool = self._pool(function, slot)
        keep = instance.healthy and not self._stopped
        if not keep:
            instance.discard()
        with pool.condition:
            if keep:
                pool.idle.append(instance)
            else:
                pool.running -= 1
            pool.condition.notify()
