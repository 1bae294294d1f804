"""The one place AWS clients are built (botocore, one session per process): by the functions' wiring, the CLI,
the local stack and the benchmarks."""

from __future__ import annotations

import os
import threading

import botocore.session
from botocore.config import Config
from botocore.exceptions import DataNotFoundError
from botocore.loaders import Loader, instance_cache

DEFAULT_MAX_ATTEMPTS = 5  # retries after the first try (botocore's `max_attempts`), with standard-mode backoff
MAX_POOL_CONNECTIONS = 32  # concurrent segment and model downloads, concurrent uploads from the CLI

# boto3 would add nothing the functions use and costs their cold start ~0.1 s of CPU to import (its
# s3transfer manager, resources, docs); S3 clients keep boto3's managed transfer methods, which import
# boto3 when one is first called (the CLI's and the benchmarks' uploads).
_BOTO3_TRANSFER_METHODS = ("upload_file", "download_file", "copy", "upload_fileobj", "download_fileobj")

_session: botocore.session.Session | None = None
# botocore sessions are not thread-safe while they build a client (components, credentials, loaded models);
# the clients they build are.
_session_lock = threading.Lock()


def aws_client(
    service: str,
    region: str,
    endpoint_url: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    timeouts: tuple[float, float] | None = None,
):
    """A client for `service` with standard-mode retries; `timeouts` (connect, read) in seconds replace
    botocore's 60 s each.

    Without `endpoint_url`, botocore's own endpoint configuration applies (AWS_ENDPOINT_URL_<SERVICE>,
    AWS_ENDPOINT_URL, the profile's), else AWS itself; without keys, the default credential chain
    (environment, profile, the function's role), resolved once per process like boto3's default session.
    """
    # Presigned S3 URLs in SigV4 (scoped to one region, valid 7 days at most), never the legacy SigV2
    # that botocore may still choose for some S3 endpoints.
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"}, max_pool_connections=MAX_POOL_CONNECTIONS,
        signature_version="s3v4" if service == "s3" else None,
        **({"connect_timeout": timeouts[0], "read_timeout": timeouts[1]} if timeouts else {}),
    )
    with _session_lock:
        return _process_session().create_client(
            service, region_name=region, endpoint_url=endpoint_url, config=config,
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
        )


def aws_session() -> botocore.session.Session:
    """The process's botocore session, which every client here comes from (its events reach them all)."""
    with _session_lock:
        return _process_session()


def forget_session() -> None:
    """The next client starts a new session: credentials and configuration are read from the environment again."""
    global _session
    with _session_lock:
        _session = None


def default_credentials():
    """The frozen default AWS credentials (environment, profile, instance role), or None when there are none."""
    credentials = botocore.session.Session().get_credentials()
    return None if credentials is None else credentials.get_frozen_credentials()


def _process_session() -> botocore.session.Session:
    global _session
    if _session is None:
        session = botocore.session.Session()
        if _DirectModelLoader.fits(Loader):  # the Lambda runtime's botocore is not pinned by this project
            data_path = session.get_config_variable("data_path")  # AWS_DATA_PATH, as botocore's own loader reads it
            session.register_component("data_loader", _DirectModelLoader(extra_search_paths=None if data_path is None else [
                os.path.expanduser(os.path.expandvars(path)) for path in data_path.split(os.pathsep)]))
        session.register("creating-client-class.s3", _add_boto3_transfer_methods)
        _session = session
    return _session


def _add_boto3_transfer_methods(class_attributes: dict, **_) -> None:
    for name in _BOTO3_TRANSFER_METHODS:
        class_attributes[name] = _boto3_transfer_method(name)


def _boto3_transfer_method(name: str):
    def method(client, *args, **kwargs):
        from boto3.s3 import inject

        return getattr(inject, name)(client, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = f"boto3's S3 `{name}` (boto3.s3.inject), imported on first use."
    return method


class _DirectModelLoader(Loader):
    """botocore's model loader, except that a service's model is read from its own directory without listing
    every service first: botocore checks the name against all 445 (~900 directory reads and 2,700 stat calls,
    0.02 s of CPU per model type, two types per client). An unknown service still gets botocore's own error."""

    @staticmethod
    def fits(loader: type) -> bool:
        """True when this botocore's Loader has the parts the override uses (else botocore's own is used)."""
        return all(hasattr(loader, name) for name in ("_find_extras", "determine_latest_version", "load_data")) and (
            "_extras_processor" in vars(loader(extra_search_paths=None)))

    @instance_cache
    def load_service_model(self, service_name, type_name, api_version=None):
        try:
            latest = self.determine_latest_version(service_name, type_name)
        except DataNotFoundError:
            return super().load_service_model(service_name, type_name, api_version)
        version = api_version or latest
        model = self.load_data(os.path.join(service_name, version, type_name))
        self._extras_processor.process(model, self._find_extras(service_name, type_name, version))
        return model
