"""
The ``pipecomet`` command: ``serve`` runs the same service as the twistd
plugin (``twistd -n pipecomet``), ``check`` validates a configuration
without serving, ``--version`` says which pipecomet this is.

``serve`` hands its options to twistd's own runner
(:func:`twisted.scripts.twistd.run`): logging, signals and the reactor are
twistd's, and the service is :func:`pipecomet._service.makeService`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pipecomet",
        description="Serve a pipecomet app (the built-in demo gateway by default).")
    parser.add_argument("--version", action="version", version=f"pipecomet {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve an app (the demo gateway by default)",
                                description="Serve an app in the foreground; the working "
                                "directory is importable (--app hello:app finds ./hello.py).")
    serve.add_argument("--app", "-a", help="module:attr of an App, or of a factory "
                       "make_app(config=, reactor=) returning one (default: the demo)")
    serve.add_argument("--config", "-c", help="TOML configuration file; it overrides only "
                       "the keys it names")
    serve.add_argument("--port", "-p", help="Twisted endpoint to listen on, e.g. tcp:8080 "
                       "or tcp:9000:interface=127.0.0.1 (default: [server] port)")
    serve.add_argument("--processes", metavar="N",
                       help="serving processes on one socket: a number or 'auto' "
                       "(default: [server] processes, 1; docs/scaling.md)")
    serve.add_argument("--workers-module", help="module the worker processes import their "
                       "functions from")

    check = commands.add_parser("check", help="validate a configuration (and the app) "
                                "without serving",
                                description="Exit 0 and print 'ok' when the configuration "
                                "and the app it serves are valid; otherwise exit 1 with a "
                                "message naming the key.")
    check.add_argument("--config", "-c", required=True, help="TOML configuration file")
    check.add_argument("--app", "-a", help="module:attr of the app the file is for "
                       "(default: [server] app, else the demo)")
    return parser


def _plugin_args(args: argparse.Namespace) -> list[str]:
    out = []
    for name in ("app", "config", "port", "workers_module", "processes"):
        value = getattr(args, name, None)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", value]
    return out


def _check(args: argparse.Namespace) -> int:
    from twisted.python import usage

    from ._service import Options

    options = Options()
    try:
        options.parseOptions(_plugin_args(args))
    except usage.UsageError as e:
        print(f"pipecomet check: {e}", file=sys.stderr)
        return 1
    print("ok")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run

    # The working directory first, as twistd would not (and as uvicorn and
    # gunicorn do); pipecomet._service adds it too for `twistd pipecomet`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # twistd's runner reads its command line from sys.argv.
    sys.argv = ["pipecomet serve", "--nodaemon", "--pidfile=", "pipecomet", *_plugin_args(args)]
    run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
