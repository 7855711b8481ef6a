"""The master port of a single-node launch: MASTER_PORT if given (checked free), else a free one.

    PORT="$(python -m mmgpt.train.master_port)"     # launch/demo.sh, launch/single_node.sh

Why: DeepSpeed's launcher defaults to 29500 for every job, so a second job on the same machine
either dies with a long EADDRINUSE traceback or, worse, its other ranks connect to the first job's
store. A port the OS hands out (bind to port 0) is free at that moment; `run_identity` catches the
rare job that grabs it in between. Multi-node launches keep an explicit port (every node must agree
on it before any of them starts). Imports no torch: it runs before every launch.
"""
from __future__ import annotations

import errno
import os
import socket
import sys

HOST = ""  # every interface: torch's store listens on all of them


class PortError(ValueError):
    """A master port that cannot be used (one line, names the port and MASTER_PORT)."""


def free_port(host: str = HOST) -> int:
    """A TCP port nothing listens on now (the OS picks one from its ephemeral range)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port(port: int, host: str = HOST) -> None:
    """Raise PortError unless the rendezvous store could listen on `port` here, as torch's would."""
    if not 0 < port < 65536:
        raise PortError(f"MASTER_PORT={port}: not a TCP port (1..65535)")
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's TCPStore server
        try:
            sock.bind((host, port))
        except OSError as err:
            reason = "in use by another process" if err.errno == errno.EADDRINUSE else err.strerror
            raise PortError(f"master port {port} (MASTER_PORT): {reason}; unset MASTER_PORT "
                            "to let the launch script pick a free port, or choose another") from None


def choose(env_value: str | None) -> int:
    """MASTER_PORT when set (must be free), else a free port."""
    if not env_value:
        return free_port()
    try:
        port = int(env_value)
    except ValueError:
        raise PortError(f"MASTER_PORT={env_value!r}: not a port number") from None
    check_port(port)
    return port


def main() -> int:
    try:
        print(choose(os.environ.get("MASTER_PORT")))
    except PortError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
