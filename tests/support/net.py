"""Loopback ports for the servers the tests start."""

import random
import socket
from pathlib import Path

# Ports the kernel hands out to outgoing connections: a port picked from this range and bound a few seconds later
# (by a server still importing its libraries) can meanwhile be taken by any client's connection.
_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
_CANDIDATES = (10000, 29999)  # below the NodePort range (30000-32767) as well
# Ports already handed out in this process: two picked before either is bound (an operator's liveness and metrics
# ports, a server's HTTP and gRPC ports) must never be the same one.
_given: set[int] = set()


def _ephemeral() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in _EPHEMERAL.read_text().split())
    except (OSError, ValueError):
        return (32768, 60999)
    return low, high


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, outside the kernel's ephemeral range, so that only
    another listener, never a client connection, can take it before the server binds it, and never handed out
    before by this process."""
    low, high = _ephemeral()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randint(*_CANDIDATES)
        if low <= port <= high or port in _given:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _given.add(port)
            return port
    with socket.socket() as s:  # no luck: let the OS pick (and race)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
