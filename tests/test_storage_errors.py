"""Which storage errors are retried (``storage.remote._transient``): only those that may heal
(dropped connections, timeouts, 5xx/408/429); missing, forbidden, any other 4xx, bad requests and
huggingface_hub's offline mode end a read at the first try, with an error naming the URL.

No network: ``faultyfs://``, a test-only subclass of fsspec's ``memory://`` (the same files) whose
``open`` and ``info`` raise the errors a test queues, counting every call. The hub's errors are
stand-ins with the same class names (the classification goes by name along the MRO, so it needs
no huggingface_hub); the real classes are checked too where huggingface_hub is installed.
"""

from __future__ import annotations

import errno
import importlib
import urllib.error

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from shardkit import Manifest
from shardkit.errors import ManifestError, ShardError
from shardkit.storage import open_store
from shardkit.storage.remote import _transient

BASE = "shardkit-errors/ds"
NAME = "shard-000000.tar"
DATA = bytes(range(256)) * 40  # 10,240 bytes
URL = f"faultyfs://{BASE}/{NAME}"
RETRIES = 6  # the default: 7 tries, ~15 s of backoff, when an error is taken for transient


class FaultyFS(MemoryFileSystem):
    """``faultyfs://``: the files of ``memory://``; each ``open`` or ``info`` first takes the
    next error of :attr:`faults` (a callable: the path -> the exception) and raises it, then
    works as usual once none are left. Every such call is counted in :attr:`calls`."""

    protocol = "faultyfs"
    faults: list = []
    calls: list = []

    @classmethod
    def _strip_protocol(cls, path):
        if isinstance(path, str):
            path = path.removeprefix("faultyfs://")
        return super()._strip_protocol(path)

    def _fault(self, what: str, path: str) -> None:
        FaultyFS.calls.append((what, path))
        if FaultyFS.faults:
            fault = FaultyFS.faults.pop(0)
            raise fault(path)

    def _open(self, path, mode="rb", **kwargs):
        self._fault("open", self._strip_protocol(path))
        return super()._open(path, mode, **kwargs)

    def info(self, path, **kwargs):
        self._fault("info", self._strip_protocol(path))
        return super().info(path, **kwargs)


fsspec.register_implementation("faultyfs", FaultyFS, clobber=True)


# ------------------------------------------------------------------ stand-ins for the hub's errors


class OfflineModeIsEnabled(ConnectionError):
    """huggingface_hub's: raised before any request when HF_HUB_OFFLINE is set."""


class Response:
    """A requests-like response: falsy for a 4xx/5xx status, as ``requests.Response`` is."""

    def __init__(self, status_code: int):
        self.status_code = status_code

    def __bool__(self) -> bool:
        return self.status_code < 400


class HfHubHTTPError(OSError):
    """huggingface_hub's HTTP error: an OSError carrying the response."""

    def __init__(self, message: str, response: Response):
        super().__init__(message)
        self.response = response


class RepositoryNotFoundError(HfHubHTTPError):
    pass


class GatedRepoError(RepositoryNotFoundError):
    pass


class EntryNotFoundError(Exception):
    pass


class LocalEntryNotFoundError(FileNotFoundError, EntryNotFoundError):
    """Raised offline (or when the hub cannot be reached) for a file not in the local cache."""


def http_error(status: int, cls: type = HfHubHTTPError):
    return lambda path: cls(f"{status} Client Error for url: https://huggingface.co/{path}",
                            Response(status))


def offline(path: str) -> Exception:
    return OfflineModeIsEnabled(f"Cannot reach https://huggingface.co/api/{path}: offline mode "
                                "is enabled. To disable it, please unset the `HF_HUB_OFFLINE` "
                                "environment variable.")


@pytest.fixture
def faulty():
    """``DATA`` at ``faultyfs://BASE/NAME``; no faults queued, no calls counted."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/{BASE}/{NAME}", DATA)
    FaultyFS.faults.clear()
    FaultyFS.calls.clear()
    yield
    FaultyFS.faults.clear()
    fs.rm(f"/{BASE.split('/')[0]}", recursive=True)


def store(**kw):
    s = open_store("faultyfs", BASE, retries=kw.pop("retries", RETRIES), timeout=10)
    s.backoff = 0.01  # type: ignore[attr-defined]  # retried faults wait little
    return s


PERMANENT = {
    "offline": offline,
    "404": http_error(404),
    "401": http_error(401),
    "403": http_error(403),
    "410": http_error(410),
    "repo-not-found": http_error(404, RepositoryNotFoundError),
    "gated-repo": lambda path: GatedRepoError("gated", Response(403)),  # no status needed
    "not-cached": lambda path: LocalEntryNotFoundError("not in the cache, outgoing traffic "
                                                       "has been disabled"),
    "permission": lambda path: PermissionError(errno.EACCES, "denied", path),
    "value": lambda path: ValueError("bad revision name"),
}


# ------------------------------------------------------------------------ (a), (b) no retries


@pytest.mark.parametrize("how", ["read_bytes", "iter_bytes", "open_range"])
@pytest.mark.parametrize("fault", sorted(PERMANENT))
def test_errors_that_cannot_heal_fail_at_the_first_try(faulty, fault, how):
    FaultyFS.faults[:] = [PERMANENT[fault]] * (RETRIES + 1)  # would fail every try
    s = store()
    read = {"read_bytes": lambda: s.read_bytes(NAME),
            "iter_bytes": lambda: b"".join(s.iter_bytes(NAME, 0, 1000)),
            "open_range": lambda: s.open_range(NAME, 0, 1000).read()}[how]
    with pytest.raises(ShardError) as info:
        read()
    assert len(FaultyFS.calls) == 1, FaultyFS.calls  # one try, no backoff
    assert info.value.url == URL and str(info.value).startswith(f"{URL}: ")
    assert "tries" not in str(info.value) and not info.value.gave_up
    if fault == "offline":
        assert "Hugging Face Hub is offline: HF_HUB_OFFLINE is set" in str(info.value)
        assert "OfflineModeIsEnabled" in str(info.value)
    elif fault == "not-cached":
        assert "not in the local Hugging Face cache" in str(info.value)
    elif fault[0].isdigit():
        assert f"{fault} Client Error" in str(info.value)


def test_size_and_manifest_of_an_offline_hub_fail_at_once_naming_the_url(faulty):
    FaultyFS.faults[:] = [offline] * (RETRIES + 1)
    with pytest.raises(ShardError, match="HF_HUB_OFFLINE is set") as info:
        store().size(NAME)
    assert info.value.url == URL and len(FaultyFS.calls) == 1
    FaultyFS.faults[:], FaultyFS.calls[:] = [offline] * (RETRIES + 1), []
    with pytest.raises(ManifestError) as error:
        Manifest.load(f"faultyfs://{BASE}", timeout=10)
    message = str(error.value)
    assert message.startswith(f"faultyfs://{BASE}/.shardkit/manifest.json: "), message
    assert "Hugging Face Hub is offline: HF_HUB_OFFLINE is set" in message
    assert len(FaultyFS.calls) == 1, FaultyFS.calls


def test_a_missing_file_is_still_not_found(faulty):
    s = store()
    assert s.size("nope.tar") is None
    with pytest.raises(ShardError, match="not found"):
        s.read_bytes("nope.tar")
    assert len(FaultyFS.calls) == 2  # one try each


# ------------------------------------------------------------------------------ (c) retries


TRANSIENT = {
    "reset": lambda path: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "503": http_error(503),
    "429": http_error(429),
    "timeout": lambda path: TimeoutError("read timed out"),
}


@pytest.mark.parametrize("how", ["read_bytes", "iter_bytes"])
def test_transient_errors_are_retried_and_the_read_succeeds(faulty, how):
    FaultyFS.faults[:] = [TRANSIENT["reset"], TRANSIENT["503"], TRANSIENT["reset"],
                          TRANSIENT["503"]]
    s = store()
    if how == "read_bytes":
        assert s.read_bytes(NAME) == DATA
    else:
        assert b"".join(s.iter_bytes(NAME, 100, 9000, chunk=1000)) == DATA[100:9000]
    assert len(FaultyFS.calls) == 5  # four failed tries, then the read


@pytest.mark.parametrize("fault", sorted(TRANSIENT))
def test_a_transient_error_that_persists_gives_up_after_the_retries(faulty, fault):
    FaultyFS.faults[:] = [TRANSIENT[fault]] * 10
    with pytest.raises(ShardError, match="after 3 tries") as info:
        store(retries=2).read_bytes(NAME)
    assert info.value.url == URL and info.value.gave_up
    assert len(FaultyFS.calls) == 3


# ------------------------------------------------------------------------ the classification


def named(name: str, module: str, base: type = Exception) -> type:
    """An exception class that looks like one of another package's."""
    return type(name, (base,), {"__module__": module})


def raised_from(outer: BaseException, cause: BaseException) -> BaseException:
    outer.__cause__ = cause
    return outer


def content_length_error() -> Exception:
    base = type("HttpProcessingError", (Exception,),
                {"__module__": "aiohttp.http_exceptions", "code": 0})
    cls = type("ContentLengthError", (base,), {"__module__": "aiohttp.http_exceptions",
                                                "code": 400})
    return cls("Not enough data to satisfy content length header")


class _Status(Exception):
    def __init__(self, **attrs):
        super().__init__("status")
        self.__dict__.update(attrs)


class _Unset(Exception):
    """httpx's errors raise RuntimeError when their request/response was never set."""

    @property
    def response(self):
        raise RuntimeError("The .response property has not been set.")


@pytest.mark.parametrize("exc, transient", [
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (ConnectionError("dropped"), True),
    (TimeoutError(), True),
    (EOFError("closed early"), True),
    (OSError("generic I/O error"), True),
    (OSError(errno.EINVAL, "invalid"), False),
    (FileNotFoundError("x"), False),
    (PermissionError("x"), False),
    (IsADirectoryError("x"), False),
    (NotADirectoryError("x"), False),
    (ValueError("x"), False),
    (TypeError("a bug"), False),
    (KeyError("a bug"), False),
    (RuntimeError("a bug"), False),
    (offline("x"), False),
    (LocalEntryNotFoundError("x"), False),
    (http_error(400)("x"), False),
    (http_error(404)("x"), False),
    (http_error(408)("x"), True),
    (http_error(429)("x"), True),
    (http_error(500)("x"), True),
    (http_error(503)("x"), True),
    (GatedRepoError("gated", Response(503)), False),  # the class says: never heals
    (named("RevisionNotFoundError", "huggingface_hub.errors", OSError)("x"), False),
    (named("EntryNotFoundError", "huggingface_hub.errors")("x"), False),
    (named("BadRequestError", "huggingface_hub.errors", OSError)("x"), False),
    (_Status(status=403), False),  # aiohttp's ClientResponseError
    (_Status(status=502), True),
    (_Status(status_code=401), False),  # azure
    (_Status(code=404), False),  # gcsfs's HttpError
    (_Status(code=503), True),
    (_Status(code="NoSuchKey"), False),  # not a status
    (_Status(response={"ResponseMetadata": {"HTTPStatusCode": 403}}), False),  # botocore
    (_Status(response={"ResponseMetadata": {"HTTPStatusCode": 500}}), True),
    (_Unset("no response"), False),
    # aiohttp: a response cut short is a ClientPayloadError raised from a ContentLengthError,
    # whose code 400 is the parser's, no status of the server's
    (raised_from(named("ClientPayloadError", "aiohttp.client_exceptions")("cut short"),
                 content_length_error()), True),
    (content_length_error(), True),
    (urllib.error.HTTPError("http://h/x", 404, "Not Found", {}, None), False),  # type: ignore
    (urllib.error.HTTPError("http://h/x", 503, "Unavailable", {}, None), True),  # type: ignore
    (raised_from(OSError("wrapped"), _Status(status=403)), False),  # s3fs wraps botocore
    (raised_from(OSError("wrapped"), _Status(status=503)), True),
    (raised_from(OSError("wrapped"), offline("x")), False),
    (named("ReadTimeout", "httpx", named("TimeoutException", "httpx"))("x"), True),
    (named("ConnectError", "httpx", named("NetworkError", "httpx"))("x"), True),
    (named("RemoteProtocolError", "httpcore")("x"), True),
    (named("UnsupportedProtocol", "httpx")("x"), False),
    (named("ServerDisconnectedError", "aiohttp.client_exceptions")("x"), True),
])
def test_what_is_transient(exc, transient):
    assert _transient(exc) is transient


def test_the_real_huggingface_hub_errors():
    errors = pytest.importorskip("huggingface_hub.errors")

    client = importlib.import_module(errors.Response.__module__.split(".")[0])

    def response(status: int):
        try:  # huggingface_hub >= 1: an httpx Response
            return errors.Response(status, request=client.Request("GET", "https://hf.co/x"))
        except (AttributeError, TypeError):  # before: a requests Response
            r = errors.Response()
            r.status_code = status
            return r

    assert not _transient(errors.OfflineModeIsEnabled("offline"))
    assert not _transient(errors.LocalEntryNotFoundError("not cached"))
    for cls in (errors.RepositoryNotFoundError, errors.GatedRepoError,
                errors.RevisionNotFoundError):
        assert not _transient(cls("x", response=response(404)))
    for status, transient in ((401, False), (403, False), (404, False), (408, True),
                              (429, True), (500, True), (503, True)):
        assert _transient(errors.HfHubHTTPError("x", response=response(status))) is transient
