"""`clipsearch ui`: resolve the stack, serve the page until interrupted, say where it is."""

from __future__ import annotations

import argparse
import errno
import json

from clipsearch.errors import ClipsearchError
from clipsearch_tools.client import ClipsearchClient, resolve_target
from clipsearch_tools.ui.server import UiServer


def serve(args: argparse.Namespace) -> int:
    target = resolve_target(args.api_url, args.bucket, args.home, needs_bucket=False)
    try:
        server = UiServer(ClipsearchClient(target), args.port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ClipsearchError(f"port {args.port} is in use: choose another with --port") from None
        raise
    how = "signed with your AWS credentials (SigV4)" if target.sign_requests else "passed straight through"
    if args.json:
        print(json.dumps({"url": server.url, "api_url": target.api_url, "signed": target.sign_requests}), flush=True)
    else:
        print(f"clipsearch ui: {server.url}  (API calls to {target.api_url}, {how}; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
