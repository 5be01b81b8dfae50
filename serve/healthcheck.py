"""The container image's health check (`python -m observe_r1_serve.healthcheck`, the Dockerfile's HEALTHCHECK).

One image runs every subcommand, so the check looks at what the container's first process runs: a
`serve` is probed on its own /health (at the port and host of its command line); anything else (train,
eval, ...) has no server to probe and is reported healthy. Exit 0: healthy, 1: not.
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path

from observe_r1_serve.config import ServerConfig

HEALTH_PATH = "/health"
# Addresses that mean "every interface": probed on the loopback one.
_ANY = {"0.0.0.0", "::", ""}


def health_url(argv: list[str]) -> str | None:
    """The /health URL of the server that `argv` (a process's command line) starts; None if it starts none."""
    names = [Path(a).name for a in argv]
    if "observe-r1" in names:
        rest = argv[names.index("observe-r1") + 1 :]
    elif argv[1:3] == ["-m", "observe_r1.cli"]:
        rest = argv[3:]
    else:
        return None
    if not rest or rest[0] != "serve":
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default=ServerConfig.host)
    parser.add_argument("--port", type=int, default=ServerConfig.port)
    args, _ = parser.parse_known_args(rest[1:])
    host = "127.0.0.1" if args.host in _ANY else args.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{args.port}{HEALTH_PATH}"


def main(cmdline: Path = Path("/proc/1/cmdline"), timeout_s: float = 4.0) -> int:
    argv = [a for a in cmdline.read_bytes().decode(errors="replace").split("\0") if a]
    url = health_url(argv)
    if url is None:
        return 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return 0 if response.status == 200 else 1
    except OSError as e:  # refused, timed out, or an HTTP error status
        print(f"{url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
