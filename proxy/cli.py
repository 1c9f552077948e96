"""``sidecar run`` and ``sidecar check-config``."""

from __future__ import annotations

import argparse
import os
import sys

from proxy.config import ConfigError, load_config

DEFAULT_CONFIG = "config/sidecar.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sidecar", description="Reliability sidecar proxy")
    commands = parser.add_subparsers(dest="command", required=True)
    run_cmd = commands.add_parser("run", help="run the proxy")
    run_cmd.add_argument(
        "--config",
        default=os.environ.get("SIDECAR_CONFIG", DEFAULT_CONFIG),
        help="config file (default: $SIDECAR_CONFIG, then config/sidecar.yaml)",
    )
    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("path", nargs="?", default=os.environ.get("SIDECAR_CONFIG", DEFAULT_CONFIG))
    args = parser.parse_args(argv)

    path = args.config if args.command == "run" else args.path
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(
            f"{path}: OK: {len(config.routes)} route(s), {len(config.upstreams)} upstream(s) "
            f"({', '.join(config.upstreams)}), store {config.store.backend}, "
            f"listen {config.listen.host}:{config.listen.port}, admin {config.admin.host}:{config.admin.port}"
        )
        return 0
    from proxy.server import run

    return run(config, path)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
