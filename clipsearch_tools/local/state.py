"""The stack home directory and its state file: where a running local stack says what it is and where."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOME_ENV = "CLIPSEARCH_HOME"
DEFAULT_HOME = ".clipsearch"
LOCAL_BUCKET = "clipsearch-local"
LOCAL_REGION = "us-east-1"
# weed accepts only these keys; they guard nothing secret, the stack listens on 127.0.0.1 only.
LOCAL_ACCESS_KEY = "clipsearch-local"
LOCAL_SECRET_KEY = "clipsearch-local-secret"


def stack_home(explicit: str | Path | None = None) -> Path:
    """--home, else $CLIPSEARCH_HOME, else .clipsearch/ in the current directory."""
    return Path(explicit or os.environ.get(HOME_ENV) or DEFAULT_HOME).resolve()


@dataclass
class StackState:
    """What `clipsearch local status` and every CLI command read to reach the running stack."""

    status: str  # starting | ready | failed | stopping | stopped
    home: str
    pid: int
    log_file: str
    error: str | None = None
    api_url: str | None = None
    bucket: str = LOCAL_BUCKET
    region: str = LOCAL_REGION
    access_key_id: str = LOCAL_ACCESS_KEY
    secret_access_key: str = LOCAL_SECRET_KEY
    s3_endpoint_url: str | None = None
    sqs_endpoint_url: str | None = None
    lambda_endpoint_url: str | None = None  # the local Lambda Invoke API (functions calling functions)
    queue_url: str | None = None
    dead_letter_queue_url: str | None = None
    task_queues: dict[str, str] = field(default_factory=dict)  # queue logical id -> URL (dataset deletion)
    database_url: str | None = None
    postgres_data_dir: str | None = None  # None when the database was given by CLIPSEARCH_DATABASE_URL
    model_id: str | None = None
    model_random_weights: bool = False
    model_dir: str | None = None
    template: str | None = None
    started_at: float | None = None
    parts: dict[str, int] = field(default_factory=dict)  # part -> pid of its process

    @classmethod
    def path(cls, home: Path) -> Path:
        return home / "state.json"

    @classmethod
    def read(cls, home: Path) -> StackState | None:
        try:
            raw = json.loads(cls.path(home).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        known = cls.__dataclass_fields__.keys()
        return cls(**{name: value for name, value in raw.items() if name in known})

    def write(self) -> None:
        path = self.path(Path(self.home))
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps(asdict(self), indent=2), encoding="utf-8")
        partial.replace(path)

    def handler_environment(self) -> dict[str, str]:
        """The environment the functions read their Settings from, pointed at this stack."""
        home = Path(self.home)
        return {
            "CLIPSEARCH_BUCKET": self.bucket,
            "CLIPSEARCH_MODEL_ID": self.model_id or "",
            "CLIPSEARCH_DATABASE_URL": self.database_url or "",
            "CLIPSEARCH_S3_ENDPOINT_URL": self.s3_endpoint_url or "",
            "CLIPSEARCH_SQS_ENDPOINT_URL": self.sqs_endpoint_url or "",
            "CLIPSEARCH_QUEUE_URL": self.queue_url or "",
            "CLIPSEARCH_MODEL_CACHE_DIR": str(home / "cache" / "models"),
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }


def pid_alive(pid: int | None) -> bool:
    """Whether `pid` still runs. A zombie does not: it has exited and waits only for a parent to reap it,
    which an orphaned supervisor's new parent (the machine's init, or a container's) may never do."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return False


def command_line(pid: int) -> list[str] | None:
    """The arguments process `pid` runs with (argv[0] first), None when it is gone or unreadable."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part] or None
