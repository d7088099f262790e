"""The listening sockets of `sot serve`: one for one worker; for several, one per worker on one address with
SO_REUSEPORT, among which the kernel spreads new connections (on one shared socket, the worker that wakes first
takes most of a burst)."""

from __future__ import annotations

import socket

import pytest

from sot.cli.serve import REUSEPORT_SPREADS, bind, worker_engine
from sot.errors import ConfigError
from sot.server.parsing import ServerSettings
from sot.server.workers import Supervisor, WorkerSpec

needs_reuseport = pytest.mark.skipif(not REUSEPORT_SPREADS, reason="SO_REUSEPORT does not spread connections here")


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_one_worker_listens_on_one_socket_without_reuseport() -> None:
    sockets = bind("127.0.0.1", 0, 1)
    try:
        assert len(sockets) == 1
        if hasattr(socket, "SO_REUSEPORT"):
            assert sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
    finally:
        close_all(sockets)


@needs_reuseport
def test_several_workers_get_one_socket_each_on_one_port_and_connections_spread_among_them() -> None:
    sockets = bind("127.0.0.1", 0, 3)
    clients: list[socket.socket] = []
    try:
        assert len(sockets) == 3
        assert len({sock.getsockname() for sock in sockets}) == 1  # port 0 asked once: all on the port it got
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for sock in sockets)
        for _ in range(60):
            clients.append(socket.create_connection(sockets[0].getsockname(), timeout=5))
        accepted = []
        for sock in sockets:
            sock.setblocking(False)
            count = 0
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                conn.close()
                count += 1
            accepted.append(count)
        assert sum(accepted) == 60
        assert min(accepted) > 0, accepted  # all on one socket: odds of 3 * (2/3)^60, about 1e-10
    finally:
        close_all(clients + sockets)


def test_a_taken_port_is_a_config_error_and_leaves_no_socket_open() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        for count in (1, 2):
            with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
                bind("127.0.0.1", port, count)
    finally:
        taken.close()


def test_the_supervisor_wants_one_shared_socket_or_one_per_worker() -> None:
    spec = WorkerSpec(build=worker_engine, params={}, settings=ServerSettings())
    sockets = bind("127.0.0.1", 0, 2)
    try:
        with pytest.raises(ValueError, match="3 workers need 1 shared socket or 3 sockets, not 2"):
            Supervisor(spec, sockets, 3)
        assert Supervisor(spec, sockets[:1], 3).sockets == sockets[:1]
    finally:
        close_all(sockets)


@needs_reuseport
def test_a_second_server_on_the_port_of_one_with_several_workers_is_refused() -> None:
    first = bind("127.0.0.1", 0, 2)
    port = first[0].getsockname()[1]
    try:
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port, 2)
    finally:
        close_all(first)
