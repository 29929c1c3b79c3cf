"""Real servers on 127.0.0.1 for the storage tests: moto's S3 and a plain HTTP server with faults.

Both bind port 0 on 127.0.0.1 only, are started and stopped by the test that uses them (context
managers), and never leave a socket operation without a timeout, so a broken client or server
fails a test instead of hanging it.

``MotoS3``
    moto in server mode (a real HTTP endpoint, not an in-process patch of botocore), so s3fs,
    aiobotocore and forked DataLoader workers all talk to it over TCP exactly as they would to S3.

``FaultyHTTPServer``
    a ``ThreadingHTTPServer`` serving a folder with ``Range`` support and switches that can be
    flipped while it runs: drop a response part-way, answer with an error status, trickle the
    body, stall after the headers, or ignore ``Range`` like a naive server.

Modelled on fsspec's ``tests/conftest.py`` (local server on port 0 with fault switches) and
mosaicml/streaming's moto fixtures.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"

__all__ = ["HOST", "FaultyHTTPServer", "MotoS3", "free_port", "server_down_url"]


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextmanager
def server_down_url() -> Iterator[str]:
    """Yield ``http://127.0.0.1:PORT/`` where nothing listens: connecting is refused at once.

    The port was bound and closed without ``listen()``, so the kernel answers a connect with RST
    (ECONNREFUSED) instead of letting it wait for a timeout.
    """
    yield f"http://{HOST}:{free_port()}/"


# --------------------------------------------------------------------------- moto S3


class MotoS3:
    """moto's S3 as a real HTTP server on 127.0.0.1 (``ThreadedMotoServer``, port 0).

    >>> with MotoS3() as s3:
    ...     s3.make_bucket("shards")
    ...     fs = s3fs.S3FileSystem(**s3.storage_options())

    The server is a thread of the test process. Forked workers (DataLoader ``fork`` context)
    reach it over TCP like any client; they must not outlive the ``with`` block, because a forked
    child keeps a copy of the listening socket (connections to a stopped server would then queue
    instead of being refused).

    moto keeps its state in process-wide backends shared with ``mock_aws``; ``reset()`` empties
    them, and ``__enter__`` does so too so every test starts with no buckets.
    """

    KEY = SECRET = "testing"
    REGION = "us-east-1"

    def __init__(self, *, port: int = 0):
        self._port = port
        self._server = None
        self.endpoint_url: str | None = None

    # lifecycle -------------------------------------------------------------

    def start(self) -> MotoS3:
        if self._server is not None:
            raise RuntimeError("MotoS3 already started")
        from moto.server import (
            ThreadedMotoServer,  # needs moto[server]: flask, flask-cors
        )

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
        server = ThreadedMotoServer(ip_address=HOST, port=self._port, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        self._server = server
        self.endpoint_url = f"http://{host}:{port}"
        self.reset()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # configuration ---------------------------------------------------------

    def storage_options(self) -> dict:
        """fsspec/s3fs keyword arguments that point at this server."""
        self._require()
        return {"key": self.KEY, "secret": self.SECRET,
                "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.REGION}}

    def env(self) -> dict[str, str]:
        """The standard AWS variables for the same endpoint and credentials.

        botocore >= 1.31 reads ``AWS_ENDPOINT_URL`` itself (checked in test_servers.py with the
        installed botocore/aiobotocore/s3fs).
        """
        self._require()
        return {"AWS_ACCESS_KEY_ID": self.KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_DEFAULT_REGION": self.REGION}

    def client(self):
        """A plain boto3 S3 client for this server (short timeouts, no retries)."""
        self._require()
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.REGION,
                            aws_access_key_id=self.KEY, aws_secret_access_key=self.SECRET,
                            config=Config(connect_timeout=5, read_timeout=10,
                                          retries={"max_attempts": 1}))

    # helpers ---------------------------------------------------------------

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (S3 naming rules apply: 3-63 chars, lowercase) and return it."""
        self.client().create_bucket(Bucket=name)
        return name

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def reset(self) -> None:
        """Forget every bucket and object (moto's ``/moto-api/reset``)."""
        self._require()
        import urllib.request

        req = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def _require(self) -> None:
        if self._server is None:
            raise RuntimeError("MotoS3 is not running: use it as a context manager or call start()")


# --------------------------------------------------------------------------- faulty HTTP

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _parse_range(header: str | None, size: int):
    """``None`` (serve everything), ``(start, stop)`` (stop exclusive) or ``"416"``.

    Single ranges only: ``a-b``, ``a-`` and ``-n``. Multi-range or malformed headers are ignored,
    as RFC 9110 allows, and the whole body is served with 200.
    """
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m[1] and not m[2]):
        return None
    if not m[1]:  # suffix: the last n bytes
        n = int(m[2])
        if n == 0 or size == 0:
            return "416"
        return max(size - n, 0), size
    start = int(m[1])
    end = int(m[2]) if m[2] else size - 1
    if end < start:
        return None  # syntactically invalid: ignore
    if start >= size:
        return "416"
    return start, min(end, size - 1) + 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers; always send Content-Length
    server_version = "FaultyHTTP/1.0"
    timeout = 10  # socket timeout on every read/write of this connection

    server: _Server

    def log_message(self, format, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except OSError:  # client went away, or stop() shut the socket: not a server error
            self.close_connection = True

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        owner = self.server.owner
        rng_header = self.headers.get("Range")
        owner._record(self.command, self.path, rng_header)

        status = owner._take_failure(self.path)
        if status is not None:
            body = f"injected {status}\n".encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            if status == 503:
                self.send_header("Retry-After", "0")
            self.end_headers()
            if not head:
                self._write(body)
            return

        path = owner._resolve(self.path)
        if path is None:
            body = b"not found\n"
            self.send_response(404)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self._write(body)
            return

        stall = None if head else owner._take_stall()
        if stall == "before_headers":
            owner._stop_event.wait()  # request read, then not a byte until stop()
            self._abort(reset=False)
            return

        if path.is_dir():  # a listing, as python -m http.server and nginx's autoindex give
            from html import escape
            from urllib.parse import quote

            links = "".join(f'<a href="{quote(p.name)}{"/" if p.is_dir() else ""}">'
                            f'{escape(p.name)}</a>\n' for p in sorted(path.iterdir()))
            data = f"<html><body>\n{links}</body></html>\n".encode()
        else:
            data = path.read_bytes()
        size = len(data)
        rng = None if owner._ignore_range else _parse_range(rng_header, size)
        if rng == "416":
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if rng is None:
            start, stop = 0, size
            self.send_response(200)
        else:
            start, stop = rng
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.send_header("Content-Type", "text/html" if path.is_dir() else "application/octet-stream")
        self.send_header("Content-Length", str(stop - start))
        if not owner._ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if head:
            return

        body = memoryview(data)[start:stop]
        if stall == "after_headers":
            self.wfile.flush()
            owner._stop_event.wait()  # headers out, then nothing until stop()
            self._abort(reset=False)
            return
        drop = owner._take_drop()
        if drop is not None:
            n_bytes, reset = drop
            self._write(body[:n_bytes])
            self._abort(reset=reset)
            return
        self._write(body)

    def _write(self, body) -> None:
        """Write the body in chunks, honouring the delay switch (interrupted by stop())."""
        owner = self.server.owner
        delay, chunk = owner._delay
        if not delay:
            owner._count(len(body))  # counted first: a client that has the bytes sees the count
            self.wfile.write(body)
            return
        for i in range(0, len(body), chunk):
            if i and owner._stop_event.wait(delay):
                self._abort(reset=False)
                return
            piece = body[i:i + chunk]
            owner._count(len(piece))
            self.wfile.write(piece)
            self.wfile.flush()

    def _abort(self, reset: bool) -> None:
        """End the connection now, whatever Content-Length promised."""
        self.close_connection = True
        try:
            self.wfile.flush()
            if reset:  # RST instead of FIN: the client sees ECONNRESET
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                           struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        # on both paths StreamRequestHandler.finish() then closes the socket


class _Server(ThreadingHTTPServer):
    """One daemon thread per connection, each tracked so stop() can cut and join it."""

    daemon_threads = True
    owner: FaultyHTTPServer

    def process_request(self, request, client_address):
        thread = threading.Thread(target=self._serve_connection, args=(request, client_address),
                                  name=f"faulty-http-conn-{client_address[1]}", daemon=True)
        self.owner._track(request, thread)
        thread.start()

    def _serve_connection(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            pass  # client disconnects and stop() land here; nothing to report
        finally:
            self.shutdown_request(request)
            self.owner._untrack(request)


class FaultyHTTPServer:
    """A threaded HTTP/1.1 file server on 127.0.0.1:0 with switchable faults.

    ``root`` is the folder served (``GET /a/b.tar`` reads ``root/a/b.tar``); without one a
    temporary folder is made, filled with :meth:`put` and removed on :meth:`stop`.

    Faults (thread-safe, may be changed while requests are in flight):

    ``drop_after(n_bytes, times=1, reset=False)``
        the next ``times`` GET bodies stop after ``n_bytes`` and the connection is closed
        (FIN, or RST with ``reset=True``) although Content-Length announced the full length.
    ``fail(status=503, times=3, path=None)``
        the next ``times`` requests (GET or HEAD; ``times=-1``: all until :meth:`reset`) are
        answered with ``status``; with ``path``, only requests for paths ending with it.
    ``delay(seconds_per_chunk, chunk=64 KiB)``
        bodies are sent in ``chunk``-byte pieces with a sleep between them, until ``delay(0)``.
    ``stall(times=None, before_headers=False)``
        GET responses send their headers (or, with ``before_headers=True``, not even those) and
        then nothing until :meth:`stop` (``times=None``: every GET until :meth:`reset`).
    ``ignore_range(True)``
        answer every request with 200 and the full body, as a server without range support.
    ``reset()``
        clear all faults (counters are kept; ``clear_counters()`` zeroes them).

    Counters: ``requests`` (a list of ``(method, path, range header or None)``, recorded when
    the request line and headers have been read) and ``bytes_sent`` (body bytes, counted just
    before each write, so a client that has received them always sees them counted).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="faulty-http-")) if root is None else Path(root)
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None
        self.port: int | None = None
        self._requests: list[tuple[str, str, str | None]] = []
        self._bytes_sent = 0
        self.reset()

    # lifecycle -------------------------------------------------------------

    def start(self) -> FaultyHTTPServer:
        if self._server is not None:
            raise RuntimeError("FaultyHTTPServer already started")
        self._stop_event.clear()
        server = _Server((HOST, 0), _Handler)
        server.owner = self
        self._server = server
        self.port = server.server_address[1]
        self.url = f"http://{HOST}:{self.port}/"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"faulty-http-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, cut every open connection (stalled ones included), join the threads."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stop_event.set()  # wakes stalled and delayed handlers
        server.shutdown()  # stops accepting
        server.server_close()
        with self._lock:
            conns, threads = list(self._conns), list(self._conns.values())
        for conn in conns:  # handlers blocked reading keep-alive requests wake with an error
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> FaultyHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # content ---------------------------------------------------------------

    def put(self, name: str, data: bytes) -> str:
        """Write ``root/name`` and return its URL."""
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return self.url_for(name)

    def url_for(self, name: str) -> str:
        if self.url is None:
            raise RuntimeError("FaultyHTTPServer is not running")
        return self.url + name.lstrip("/")

    # fault switches --------------------------------------------------------

    def drop_after(self, n_bytes: int, times: int = 1, *, reset: bool = False) -> None:
        with self._lock:
            self._drop = (int(n_bytes), int(times), bool(reset))

    def fail(self, status: int = 503, times: int = 3, path: str | None = None) -> None:
        with self._lock:
            self._fail = (int(status), int(times), path)

    def delay(self, seconds_per_chunk: float, chunk: int = 64 * 1024) -> None:
        if chunk <= 0:
            raise ValueError(f"chunk must be positive, got {chunk}")
        with self._lock:
            self._delay = (float(seconds_per_chunk), int(chunk))

    def stall(self, times: int | None = None, *, before_headers: bool = False) -> None:
        with self._lock:
            self._stall = (-1 if times is None else int(times), bool(before_headers))

    def ignore_range(self, flag: bool = True) -> None:
        with self._lock:
            self._ignore_range = bool(flag)

    def reset(self) -> None:
        with self._lock:
            self._drop = (0, 0, False)
            self._fail = (503, 0, None)
            self._delay = (0.0, 64 * 1024)
            self._stall = (0, False)
            self._ignore_range = False

    def clear_counters(self) -> None:
        with self._lock:
            self._requests.clear()
            self._bytes_sent = 0

    # counters --------------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str, str | None]]:
        with self._lock:
            return list(self._requests)

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return self._bytes_sent

    # used by the handler ---------------------------------------------------

    def _record(self, method: str, path: str, rng: str | None) -> None:
        with self._lock:
            self._requests.append((method, path, rng))

    def _count(self, n: int) -> None:
        with self._lock:
            self._bytes_sent += n

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            status, times, only = self._fail
            if times == 0 or (only is not None and not path.split("?")[0].endswith(only)):
                return None
            self._fail = (status, times - 1 if times > 0 else times, only)
            return status

    def _take_drop(self):
        with self._lock:
            n, times, reset = self._drop
            if times <= 0:
                return None
            self._drop = (n, times - 1, reset)
            return n, reset

    def _take_stall(self) -> str | None:
        with self._lock:
            times, before = self._stall
            if times == 0:
                return None
            if times > 0:
                self._stall = (times - 1, before)
            return "before_headers" if before else "after_headers"

    def _resolve(self, url_path: str) -> Path | None:
        from urllib.parse import unquote, urlsplit

        rel = unquote(urlsplit(url_path).path).lstrip("/")
        root = self.root.resolve()
        path = (root / rel).resolve()
        if root != path and root not in path.parents:
            return None  # no escaping the served folder
        return path if path.is_file() or path.is_dir() else None

    def _track(self, conn: socket.socket, thread: threading.Thread) -> None:
        with self._lock:
            self._conns[conn] = thread

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.pop(conn, None)
