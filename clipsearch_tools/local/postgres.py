"""A PostgreSQL cluster started from the installed server binaries (local stack and tests)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from clipsearch.errors import ClipsearchError
from clipsearch_tools.local.ports import free_port


class PostgresUnavailable(ClipsearchError):
    """No PostgreSQL server binaries, or the cluster would not start."""


def find_bin_dir() -> Path:
    """The directory holding initdb/pg_ctl: $PG_BIN, then PATH, then Debian's versioned folders."""
    candidates = [os.environ.get("PG_BIN", "")]
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).resolve().parent))
    candidates += sorted((str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    raise PostgresUnavailable(
        "PostgreSQL server binaries not found: install postgresql (apt-get install postgresql) "
        "or set PG_BIN, or give an existing server with CLIPSEARCH_DATABASE_URL"
    )


@dataclass
class PostgresCluster:
    data_dir: Path
    port: int
    bin_dir: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    @property
    def log_file(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if os.geteuid() == 0:  # the server refuses to run as root
            command = [_runuser(), "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True)

    def initialize(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _hand_to_postgres_user(self.data_dir)
        result = self._run(
            "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust", "--no-sync",
            "-E", "UTF8", check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(f"initdb failed: {result.stderr.strip()}")

    def start(self, timeout: float = 30.0) -> None:
        self.initialize()
        self.log_file.touch()
        _hand_to_postgres_user(self.log_file)
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.data_dir} -c fsync=off"
        result = self._run(
            "pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-o", options,
            "-w", "-t", str(int(timeout)), "start", check=False,
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"PostgreSQL did not start on port {self.port}: {result.stderr.strip()} "
                f"(log: {self.log_file})"
            )
        _wait_for_port(self.port, timeout)

    def is_running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0

    def stop(self) -> None:
        if self.data_dir.exists():
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop", check=False)


def start_cluster(data_dir: Path, port: int | None = None) -> PostgresCluster:
    cluster = PostgresCluster(Path(data_dir).resolve(), port or free_port(), find_bin_dir())
    cluster.start()
    return cluster


def _runuser() -> str:
    """runuser lives in sbin, which a non-login shell's PATH may lack."""
    for candidate in (shutil.which("runuser"), "/usr/sbin/runuser", "/sbin/runuser"):
        if candidate and Path(candidate).exists():
            return candidate
    raise PostgresUnavailable("running PostgreSQL as root needs runuser (util-linux), which was not found")


def _hand_to_postgres_user(path: Path) -> None:
    if os.geteuid() != 0:
        return
    user = pwd.getpwnam("postgres")
    for parent in [path, *path.parents]:
        if parent == Path("/"):
            break
        if parent == path:
            os.chown(parent, user.pw_uid, user.pw_gid)
        else:  # the server user must be able to reach the data directory
            os.chmod(parent, os.stat(parent).st_mode | 0o011)


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise PostgresUnavailable(f"PostgreSQL did not accept connections on port {port}")


def main(argv: list[str] | None = None) -> int:
    """`python -m clipsearch_tools.local.postgres start|stop DATA_DIR [PORT]`: prints the URL on start."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2 or args[0] not in {"start", "stop"}:
        print("usage: python -m clipsearch_tools.local.postgres start|stop DATA_DIR [PORT]", file=sys.stderr)
        return 2
    data_dir = Path(args[1])
    if args[0] == "stop":
        PostgresCluster(data_dir.resolve(), 0, find_bin_dir()).stop()
        return 0
    cluster = start_cluster(data_dir, int(args[2]) if len(args) > 2 else None)
    print(cluster.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
