"""A lease: a lock object with an expiry, kept beside the data it guards (local folder or S3).

Two scheduled runs that overlap (a retraining that takes longer than its period, a person starting
one by hand) must not both write a dataset. The first run *acquires* ``<dataset>/leases/<name>.json``;
the second finds it held and stops with :class:`LeaseHeld`, whose one-line message says who holds it
and until when. A holder that dies does not block forever: once ``expires_at`` has passed, the next
acquirer takes the lease over. A long run keeps its lease by *renewing* it (``with lease:`` does so
on a background thread every ``ttl_s / 3``) and *releases* it at the end.

The lock object (JSON)::

    {"format": "geco-lease/1", "holder": "user@host pid 123 (geco retrain)", "token": "<uuid>",
     "acquired_at": 1.7e9, "renewed_at": 1.7e9, "expires_at": 1.7e9, "ttl_s": 3600, "uri": "..."}

Atomicity (what makes two acquirers unable to both win):

* **S3**: conditional writes. Creating is ``PutObject`` with ``If-None-Match: *`` (the server refuses
  with 412 when the object exists); taking over an expired lease, renewing and releasing are
  conditional on the ETag read (``If-Match``), so of two racers exactly one succeeds. AWS S3 supports
  both since 2024, as do MinIO and SeaweedFS (checked against ``weed mini``: a second create, a stale
  ``If-Match`` PUT and a stale ``If-Match`` DELETE are each refused with ``PreconditionFailed``). A
  store that ignores these headers gives no such guarantee: the read-back after each write then
  catches most, not all, races.
* **Local paths** (one machine, or a shared filesystem with working ``flock``): every
  read-check-write happens under an exclusive ``flock`` on a guard file beside the lease
  (``.<name>.json.guard``), and the lease itself is written atomically (:func:`geco.storage.write_text`).

Times are Unix seconds from the writer's clock: keep ``ttl_s`` far above the clock skew between
machines (minutes against NTP's milliseconds). The token, never the holder text, identifies the
holder: two processes of one user on one host are different holders.
"""
from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Iterator

from geco import storage

__all__ = ["Lease", "LeaseError", "LeaseHeld", "LeaseInfo", "LeaseLost", "default_holder", "lease_uri"]

FORMAT = "geco-lease/1"
_PRECONDITION = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")
log = logging.getLogger(__name__)


class LeaseError(RuntimeError):
    """A lease could not be taken or kept."""


class LeaseHeld(LeaseError):
    """Someone else holds the lease and it has not expired: ``info`` says who and until when."""

    def __init__(self, uri: str, info: "LeaseInfo"):
        self.uri, self.info = uri, info
        super().__init__(f"{uri}: held by {info.holder} until {_iso(info.expires_at)} (acquired "
                         f"{_iso(info.acquired_at)}); another run is writing this dataset: wait for it to "
                         f"finish, or, if it died, for the lease to expire")


class LeaseLost(LeaseError):
    """Our lease was taken over (it expired before we renewed it) or removed."""


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    token: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    ttl_s: float

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    @classmethod
    def from_json(cls, text: str) -> "LeaseInfo":
        d = json.loads(text)
        return cls(**{k: d[k] for k in ("holder", "token", "acquired_at", "renewed_at", "expires_at", "ttl_s")})


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def default_holder() -> str:
    """``user@host pid N (command)``: what a refused run prints about the holder."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry (containers)
        user = str(os.getuid())
    command = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    return f"{user}@{socket.gethostname()} pid {os.getpid()} ({command})"


def lease_uri(dataset_uri: str, name: str = "writer") -> str:
    """Where a dataset's lease called ``name`` lives: ``<dataset>/leases/<name>.json``."""
    return storage.join(dataset_uri, "leases", f"{name}.json")


def _is_precondition(err: BaseException) -> bool:
    response = getattr(err, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
    return code in _PRECONDITION or status in ("412", "409")


class Lease:
    """A lease at ``uri`` (see the module docstring), held by ``holder`` for ``ttl_s`` seconds at a time.

    ``acquire()`` / ``renew()`` / ``release()``; or ``with Lease(...) as info:`` which acquires,
    renews every ``ttl_s / 3`` in the background and releases on exit (``lost`` is then set if a
    renewal found the lease taken over). ``clock`` is for tests."""

    def __init__(self, uri: str, *, ttl_s: float = 3600.0, holder: str | None = None, clock=time.time):
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.uri = uri
        self.ttl_s = float(ttl_s)
        self.holder = holder or default_holder()
        self.token = uuid.uuid4().hex
        self.clock = clock
        self.info: LeaseInfo | None = None  # ours, while held
        self.lost: LeaseLost | None = None
        self._etag: str | None = None  # S3: the ETag of the object we wrote last
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public ------------------------------------------------------------------------------
    def read(self) -> LeaseInfo | None:
        """The lease as stored now (None: nobody holds it)."""
        found = self._get()
        return found[0] if found else None

    def acquire(self) -> LeaseInfo:
        """Take the lease; an expired one is taken over. Raises :class:`LeaseHeld` when someone else
        holds it; re-acquiring our own lease renews it."""
        if storage.is_s3(self.uri):
            return self._acquire_s3()
        with self._guard():
            current = self._get()
            if current and current[0].token != self.token and not current[0].expired(self.clock()):
                raise LeaseHeld(self.uri, current[0])
            if current and current[0].token != self.token:
                log.warning("lease %s: taking over from %s (expired %s)", self.uri, current[0].holder,
                            _iso(current[0].expires_at))
            return self._write_local(self._record(acquired_at=None))

    def renew(self) -> LeaseInfo:
        """Push our expiry ``ttl_s`` ahead. Raises :class:`LeaseLost` when it is no longer ours."""
        if self.info is None:
            raise LeaseLost(f"{self.uri}: not held by this process; acquire it first")
        if storage.is_s3(self.uri):
            return self._put_s3(self._record(self.info.acquired_at), if_match=self._etag, lost=True)
        with self._guard():
            current = self._get()
            if not current or current[0].token != self.token:
                raise self._lost(current[0] if current else None)
            return self._write_local(self._record(self.info.acquired_at))

    def release(self) -> bool:
        """Give the lease up (True); False when it was not ours any more (taken over after expiring)."""
        if self.info is None:
            return False
        self.info = None
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            try:
                with storage.s3_errors(self.uri):
                    try:
                        storage.s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
                    except Exception as e:
                        if _is_precondition(e):
                            log.warning("lease %s: not released, someone else holds it now", self.uri)
                            return False
                        raise
            except FileNotFoundError:
                return False
            return True
        with self._guard():
            current = self._get()
            if not current or current[0].token != self.token:
                return False
            storage.delete(self.uri)
            return True

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the background renewal found the lease taken over: call it
        before each commit (a new manifest version, an alias move) of a long run."""
        if self.lost is not None:
            raise self.lost

    def __enter__(self) -> LeaseInfo:
        info = self.acquire()
        self._stop.clear()
        self._thread = threading.Thread(target=self._keep_alive, name=f"lease-{Path(self.uri).name}", daemon=True)
        self._thread.start()
        return info

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.release()

    # -- internals ---------------------------------------------------------------------------
    def _keep_alive(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLost as e:
                self.lost = e
                log.error("lease %s: %s", self.uri, e)
                return
            except Exception as e:  # a storage hiccup: try again at the next tick, before the expiry
                log.warning("lease %s: renewal failed (%s); retrying", self.uri, e)

    def _record(self, acquired_at: float | None) -> LeaseInfo:
        now = self.clock()
        return LeaseInfo(holder=self.holder, token=self.token, acquired_at=now if acquired_at is None else acquired_at,
                         renewed_at=now, expires_at=now + self.ttl_s, ttl_s=self.ttl_s)

    def _body(self, info: LeaseInfo) -> bytes:
        return (json.dumps({"format": FORMAT, **asdict(info), "uri": self.uri,
                            "expires_at_utc": _iso(info.expires_at)}, indent=1, sort_keys=True) + "\n").encode()

    def _lost(self, current: LeaseInfo | None) -> LeaseLost:
        self.info = None
        who = f"now held by {current.holder} until {_iso(current.expires_at)}" if current else "it was removed"
        return LeaseLost(f"{self.uri}: our lease ({self.holder}) was lost: {who}; renew more often than ttl_s "
                         f"({self.ttl_s:g} s)")

    def _get(self) -> tuple[LeaseInfo, str] | None:
        """(lease, etag) as stored, or None."""
        if storage.is_s3(self.uri):
            bucket, key = storage.split_s3(self.uri)
            try:
                with storage.s3_errors(self.uri):
                    obj = storage.s3_client().get_object(Bucket=bucket, Key=key)
                    return LeaseInfo.from_json(obj["Body"].read().decode()), obj["ETag"]
            except FileNotFoundError:
                return None
        try:
            return LeaseInfo.from_json(Path(self.uri).read_text(encoding="utf-8")), ""
        except FileNotFoundError:
            return None

    # local
    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        path = Path(self.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.guard"), "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _write_local(self, info: LeaseInfo) -> LeaseInfo:
        storage.write_bytes(self.uri, self._body(info))
        self.info = info
        return info

    # S3
    def _acquire_s3(self) -> LeaseInfo:
        for _ in range(5):  # a lease released between our PUT and our GET: try again
            try:
                return self._put_s3(self._record(None), if_none_match=True)
            except _Exists:
                pass
            current = self._get()
            if current is None:
                continue
            info, etag = current
            if info.token == self.token or info.expired(self.clock()):
                if info.token != self.token:
                    log.warning("lease %s: taking over from %s (expired %s)", self.uri, info.holder,
                                _iso(info.expires_at))
                try:
                    return self._put_s3(self._record(None), if_match=etag)
                except _Exists:
                    continue  # another acquirer took it over first: look again
            raise LeaseHeld(self.uri, info)
        raise LeaseError(f"{self.uri}: the lease kept changing hands while acquiring it; try again")

    def _put_s3(self, info: LeaseInfo, *, if_none_match: bool = False, if_match: str | None = None,
                lost: bool = False) -> LeaseInfo:
        bucket, key = storage.split_s3(self.uri)
        kwargs: dict = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
        with storage.s3_errors(self.uri, missing="bucket"):
            try:
                put = storage.s3_client().put_object(Bucket=bucket, Key=key, Body=self._body(info),
                                                     ContentType="application/json", **kwargs)
            except Exception as e:
                if not _is_precondition(e):
                    raise
                if lost:
                    current = self._get()
                    raise self._lost(current[0] if current else None) from None
                raise _Exists() from None
        stored = self._get()  # read back: catches a store that ignored the condition and lost a race
        if stored is None or stored[0].token != self.token:
            if lost:
                raise self._lost(stored[0] if stored else None)
            raise _Exists()
        self._etag = stored[1] or put.get("ETag")
        self.info = info
        return info


class _Exists(Exception):
    """Internal: a conditional write was refused."""
