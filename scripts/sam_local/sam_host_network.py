"""Runs the SAM CLI with every Lambda container on the host's network and no image pulls.

SAM CLI 1.170 accepts `--docker-network host` but still publishes the emulator's port on a bridge, where
127.0.0.1 is the container itself, so functions cannot reach the PostgreSQL and S3/SQS endpoints that
listen on this machine's loopback. This wrapper adjusts SAM's docker-py calls instead: each Lambda
container gets network_mode=host, its emulator listens on the loopback port SAM chose for it, and its
runtime API on another free loopback port (two containers on the host's network cannot share
RIE's default 127.0.0.1:9001). No registry is reachable or wanted here, so any pull fails loudly.

Usage: .venv-sam/bin/python scripts/sam_local/sam_host_network.py <sam arguments>
"""

from __future__ import annotations

import sys
from pathlib import Path

import docker.api.image
import docker.models.containers
import docker.models.images
from samcli.cli.main import cli

sys.path.append(str(Path(__file__).resolve().parents[2]))  # the repository, for its port choice (stdlib only)
from clipsearch_tools.local.ports import free_port  # noqa: E402  (below the ephemeral range: no connection takes it)

EMULATOR = "/var/rapid/aws-lambda-rie"
EMULATOR_CONTAINER_PORT = "8080"
LOOPBACK = "127.0.0.1"
SUBCOMMANDS_THAT_RUN_CONTAINERS = {"invoke", "start-api", "start-lambda"}


class ImagePullRefused(RuntimeError):
    """Raised instead of contacting a registry."""


def on_host_network(options: dict) -> dict:
    """The container options SAM built for a Lambda container, moved onto the host's network."""
    entrypoint = options.get("entrypoint") or []
    if not entrypoint or entrypoint[0] != EMULATOR:
        return options
    published = options.pop("ports", {}) or {}
    _, emulator_port = published[EMULATOR_CONTAINER_PORT]
    return {
        **options,
        "network_mode": "host",
        "entrypoint": [
            *entrypoint,
            "--runtime-interface-emulator-address", f"{LOOPBACK}:{emulator_port}",
            "--runtime-api-address", f"{LOOPBACK}:{free_port()}",
        ],
    }


def refuse_pull(*args, **kwargs):
    raise ImagePullRefused(
        f"refusing to pull {args[1:2] or kwargs}: no registry may be contacted; build the image locally "
        "(scripts/sam_local/setup.sh) and pass --skip-pull-image"
    )


def install_patches() -> None:
    create = docker.models.containers.ContainerCollection.create

    def create_on_host_network(self, image, command=None, **options):
        return create(self, image, command, **on_host_network(options))

    docker.models.containers.ContainerCollection.create = create_on_host_network
    docker.models.images.ImageCollection.pull = refuse_pull
    docker.api.image.ImageApiMixin.pull = refuse_pull


def with_skip_pull(arguments: list[str]) -> list[str]:
    """`sam local invoke|start-api|start-lambda` always gets --skip-pull-image."""
    if (len(arguments) >= 2 and arguments[0] == "local" and arguments[1] in SUBCOMMANDS_THAT_RUN_CONTAINERS
            and "--skip-pull-image" not in arguments):
        return [*arguments[:2], "--skip-pull-image", *arguments[2:]]
    return arguments


if __name__ == "__main__":
    install_patches()
    cli(args=with_skip_pull(sys.argv[1:]), prog_name="sam")
