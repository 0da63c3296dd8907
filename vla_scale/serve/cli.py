"""`vla-scale serve EXPORT`: serve an exported policy over websocket until Ctrl-C / SIGTERM."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `serve` on the `vla-scale` subcommand parser."""
    p = sub.add_parser("serve", help="serve a policy export over websocket + msgpack (see README: Serving a policy)")
    p.add_argument("export", help="policy export folder (or a run directory, exported on load)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (printed) (default: 8000)")
    p.add_argument("--device", default="cpu", help="torch device of the policy (default: cpu)")
    p.add_argument("--max-message-mb", type=float, default=16.0, help="larger requests get an error reply (MiB)")
    p.add_argument("--control-rate", type=float, default=None, help="robot control rate in Hz, sent in the metadata")
    p.add_argument("--delay-ms", type=float, default=0.0, help="extra time per inference, to test with a slow model")
    p.add_argument(
        "--max-connections", type=int, default=64, help="more clients are refused (HTTP 503) (default: %(default)s)"
    )
    p.set_defaults(fn=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from vla_scale.serve.server import load_server

    try:
        server = load_server(
            args.export,
            device=args.device,
            host=args.host,
            port=args.port,
            max_message_bytes=int(args.max_message_mb * 2**20),
            delay_s=args.delay_ms / 1e3,
            control_rate_hz=args.control_rate,
            max_connections=args.max_connections,
        )
    except (OSError, ValueError) as err:
        print(f"vla-scale serve: error: {err}", file=sys.stderr)
        return 2
    server.run(announce=True)
    return 0
