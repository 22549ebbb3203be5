"""``sdtrain serve``: a local web UI on Starlette and uvicorn to start, watch, stop, resume and compare runs, edit a
data folder's captions and generate from exported models (docs/serve.md).

Pages: ``/`` the runs under the root and the queue; ``/new`` a new run (a preset, a data folder browsed under the
root, the config's keys as a form; checked by the config system and its memory estimated before it is queued);
``/run/<path>`` a run watched live (server-sent events: step, loss and learning rate, images per second, time left,
samples as a timeline, the log's tail; stop and resume; generation from its models); ``/compare?run=a&run=b``;
``/captions?path=<folder>``. Runs are ``sdtrain train`` processes started by a queue kept in a file under the root
(:mod:`sdtrain.web.queue`), one at a time per device; they outlive the server.

Its doors: every file it reads, lists or serves is resolved under the root (links followed); it answers requests
addressed to its own host names only (DNS rebinding); a request that changes anything carries the root's token
of its own pages and their origin; bodies are capped at 64 KiB; uvicorn parses the requests (malformed ones are a
400) and closes idle connections. It binds to 127.0.0.1 by default: it trains and runs models on request, so it is
not for the open internet.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import socket
import threading
from pathlib import Path
from typing import IO

from sdtrain.errors import UserError

IDLE_SECONDS = 20  # a connection that sends nothing for this long is closed


def host_names(host: str, port: int, allowed: tuple[str, ...] = ()) -> set[str]:
    """The ``Host`` values a server bound to ``host:port`` answers: the bound name, the loopback names for a loopback
    (or any-address) bind, and the ``allowed`` names (how others reach a server bound to 0.0.0.0)."""
    names = {host.lower(), *(name.lower() for name in allowed)} - {"", "0.0.0.0", "::"}
    if host in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: any free port), or one line saying why not."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?): choose another with --port, "
                            f"say --port {port + 1}") from None  # fmt: skip
        if e.errno == errno.EADDRNOTAVAIL or isinstance(e, socket.gaierror):
            raise UserError(f"cannot listen on {host}: not an address of this machine (--host)") from None
        if e.errno == errno.EACCES:
            raise UserError(f"port {port} is privileged: choose one over 1023 with --port") from None
        raise
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def _protocol():
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request within its keep-alive
    timeout of connecting or of its last answer (uvicorn alone waits forever for a request begun and never finished:
    a client sending one byte now and then would hold a connection for good)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            self.loop.call_later(self.timeout_keep_alive, self._close_if_idle, self.cycle)

        def _close_if_idle(self, cycle) -> None:
            """Close unless a request came since (a new cycle) that is still being answered."""
            answering = self.cycle is not None and self.cycle is not cycle and not self.cycle.response_complete
            if not answering and not self.transport.is_closing():
                self.transport.close()

    return Protocol


def _hold_root(state: Path, url: str, sock) -> IO[str]:
    """The root's server lock (``.sdtrain/server.lock``, an exclusive ``flock`` held while this server lives, the
    operating system's to release if it dies), naming this server's address and pid for the next one's message.

    Raises:
        UserError: another server holds the root (its queue file has one writer).
    """
    lock = open(state / "server.lock", "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        sock.close()
        raise UserError(f"{state.parent} is already served by {holder}: one server per folder (its runs' queue "
                        "is one file); open that one, or stop it first") from None  # fmt: skip
    lock.seek(0)
    lock.truncate()
    lock.write(f"sdtrain serve at {url} (pid {os.getpid()})")
    lock.flush()
    return lock


def _root_token(state: Path) -> str:
    """The root's token for changes (``.sdtrain/token``, made once, readable by its owner only): the same across
    server restarts, so a page opened before one still works after it."""
    path = state / "token"
    if not path.is_file():
        fd = os.open(path.with_name(f".token-{os.getpid()}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24))
        os.replace(path.with_name(f".token-{os.getpid()}"), path)
    return path.read_text().strip()


class Server:
    """The web UI over a root, bound and ready: :meth:`serve_forever` (the CLI) or :meth:`start` / :meth:`stop` (a
    thread: tests, notebooks). ``url`` is where it answers; ``queue`` its runs."""

    def __init__(self, root, host="127.0.0.1", port=8000, device=None, max_models=1, allowed_hosts=(),
                 devices=("default",), schedule=True):  # fmt: skip
        import uvicorn

        from sdtrain.web.app import Models, make_app
        from sdtrain.web.files import Root
        from sdtrain.web.queue import Queue

        self.root = Root(root)
        if not self.root.path.is_dir():
            raise UserError(f"{root}: no such folder to serve (--root)")
        self.socket = _bind(host, port)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"
        self._lock = _hold_root(self.root.state_dir(), self.url, self.socket)
        self.queue = Queue(self.root, tuple(devices))
        self.models = Models(device, max_models)
        hosts = host_names(host, self.port, tuple(allowed_hosts))
        self.app = make_app(self.root, self.queue, self.models, hosts, _root_token(self.root.state_dir()))
        config = uvicorn.Config(self.app, http=_protocol(), log_level="warning", timeout_keep_alive=IDLE_SECONDS,
                                limit_concurrency=64,
                                h11_max_incomplete_event_size=16 * 1024, timeout_graceful_shutdown=2,
                                server_header=False)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.schedule = schedule
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        if self.schedule:
            self.queue.start()
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.queue.close()
            self.socket.close()
            self._lock.close()  # the root is free for the next server

    def start(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="sdtrain-web", daemon=True)
        self._thread.start()
        while not self.server.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


def serve(
    root: str | Path = ".",
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str | None = None,
    max_models: int = 1,
    allowed_hosts: tuple[str, ...] = (),
    devices: tuple[str, ...] = ("default",),
) -> None:
    """Serve the web UI over ``root`` until interrupted (the runs it started go on)."""
    server = Server(root, host, port, device, max_models, allowed_hosts, devices)
    print(f"sdtrain: serving {server.root.path} at {server.url}/ (Ctrl-C stops the server; runs go on)")
    server.serve_forever()
