"""One job per output: a lease object under the output root, taken before anything is listed or written.

The lease (``_lease.json``: holder id, host, pid, job id, started, renewed, expires) is taken with a conditional
create, renewed every ttl/3 while the job runs and released at the end; a second job on the same output stops
with ``LeaseHeld`` naming the holder, and a lease past its expiry (its job died) is taken over.

Every change is a compare-and-swap, so two jobs racing for the same lease cannot both win:
- S3: create with ``If-None-Match: *``; renew, take over and release with ``If-Match: <ETag>`` of the version
  read (S3 refuses the request with 412 if anyone wrote in between).
- local disks: the same compare-and-swap on the file's bytes inside a short ``filelock`` critical section
  (``<key>.lock`` beside the lease); the lease itself is created exclusively and replaced by an atomic rename.
- other filesystems offer neither: the same steps without the lock, with a warning that the lease is advisory.
Clocks: expiry compares the holder's wall clock with ours, so hosts must agree to well within the ttl (NTP).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import nullcontext
from datetime import datetime, timezone

from filelock import FileLock
from fsspec.asyn import sync

from .errors import s3_error_code
from .storage import S3_PROTOCOLS, Storage, redact, redact_text

log = logging.getLogger(__name__)

_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"}


# The signal that stops a driver whose lease is lost. Not SIGINT: a job started in the background (nohup, CI, a
# job runner) ignores SIGINT, and then neither SIGINT nor ``_thread.interrupt_main`` does anything.
LOST_SIGNAL = getattr(signal, "SIGUSR2", None)


def _interrupt(signum, frame):
    raise KeyboardInterrupt("the lease was lost")


class LeaseHeld(RuntimeError):
    """Another job holds the lease on this output; the message names it (host, pid, job id, since, expiry)."""


class LeaseLost(RuntimeError):
    """Our lease was taken over or deleted by someone else (or could not be renewed before it expired)."""


class _Conflict(Exception):
    """The lease changed since we read it (a compare-and-swap failed)."""


class Lease:
    """``with Lease(Storage(output)) as lease:`` takes the lease (or raises LeaseHeld), renews it in a daemon
    thread every ttl/3 and releases it on exit; ``lease.lost`` turns True when a renewal finds the lease gone or
    taken, and ``lease.check()`` raises LeaseLost then. ``holder`` adds fields to the record (e.g. job_id);
    ``stop_main=True``: when the lease is lost, the main thread is interrupted at once, even while it blocks (a
    signal handler raises KeyboardInterrupt there, which ``__exit__`` turns into LeaseLost): a job stops writing
    then, not after its dataset, when another job may own the output."""

    def __init__(self, storage: Storage, ttl: float = 120.0, key: str = "_lease.json", holder: dict | None = None,
                 stop_main: bool = False):
        self.storage, self.ttl, self.key = storage, float(ttl), key
        self.stop_main = stop_main
        self._installed, self._previous = False, None  # our LOST_SIGNAL handler, and the one it replaced
        self.id = uuid.uuid4().hex
        self.info = {"holder": self.id, "host": socket.gethostname(), "pid": os.getpid(), "job_id": None,
                     **redact(dict(holder or {}))}
        self.url = redact_text(storage.url(key))
        self._store = _store_for(storage, key)
        self._record: dict | None = None  # what we last wrote
        self._token = None  # its version: ETag on S3, the bytes elsewhere
        self._started = ""
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def held(self) -> bool:
        return self._token is not None and not self.lost

    def check(self) -> None:
        """Raises LeaseLost if another job took or deleted the lease: call before writing results."""
        if self.lost:
            raise LeaseLost(f"lost the lease on {self.url}: another job took it over or it was deleted")

    def acquire(self) -> "Lease":
        self._started = _iso(time.time())
        self._lost.clear()
        for _ in range(8):  # each turn ends because someone else changed the lease: look again
            record = self._new_record()
            try:
                self._wrote(record, self._store.create(_dumps(record)))
                return self
            except FileExistsError:
                pass
            current = self._store.read()
            if current is None:  # released in between
                continue
            held, token = current
            if held.get("holder") == self.id:  # our own create, whose answer was lost and retried
                self._wrote(held, token)
                return self
            if held and time.time() <= _expires(held):
                raise LeaseHeld(self._describe(held))
            try:
                self._wrote(record, self._store.replace(_dumps(record), token))
            except _Conflict:
                continue
            log.warning("took over the stale lease on %s: %s", self.url, self._describe(held) if held else "unreadable")
            return self
        raise LeaseHeld(f"{self.url} keeps changing under us: another job is taking this output")

    def renew(self) -> None:
        """Extends the expiry by ttl from now; raises LeaseLost (and sets ``lost``) if the lease is not ours."""
        self.check()
        if self._token is None:
            raise LeaseLost(f"the lease on {self.url} was never taken or was released")
        record = self._new_record()
        try:
            self._wrote(record, self._store.replace(_dumps(record), self._token))
            return
        except _Conflict:
            current = self._store.read()
        if current is not None and current[0] == record:  # our write went through; its answer was lost
            self._wrote(record, current[1])
            return
        self._lost.set()
        now = "deleted" if current is None else f"now {self._describe(current[0])}"
        raise LeaseLost(f"lost the lease on {self.url} ({now})")

    def release(self) -> None:
        """Deletes the lease if it is still ours; a lease someone else holds now is left alone."""
        self._stop_renewal()
        if self._token is None or self.lost:
            self._token = None
            return
        try:
            self._store.delete(self._token)
        except _Conflict:
            log.warning("the lease on %s is no longer ours; left in place", self.url)
        self._token = None

    def __enter__(self) -> "Lease":
        self.acquire()
        if self.stop_main and LOST_SIGNAL and threading.current_thread() is threading.main_thread():
            self._previous, self._installed = signal.signal(LOST_SIGNAL, _interrupt), True
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            try:
                self.release()  # stops the renewal thread first: no signal comes after this
            except KeyboardInterrupt as late:  # lost just as the job ended
                exc_type, exc = KeyboardInterrupt, late
            except Exception as err:  # noqa: BLE001 - never mask the job's own outcome; the lease expires anyway
                log.warning("could not release the lease on %s (it expires in %.0f s): %s", self.url,
                            max(0.0, _expires(self._record or {}) - time.time()), redact_text(str(err)))
        finally:
            if self._installed:
                signal.signal(LOST_SIGNAL, self._previous if self._previous is not None else signal.SIG_DFL)
                self._installed = False
        if exc_type is KeyboardInterrupt and self.lost:  # the interrupt of stop_main
            raise LeaseLost(f"lost the lease on {self.url}: another job took it over or it was deleted; "
                            "stopped") from exc
        return False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as err:
                log.error("%s", err)
                break
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried at the next tick
                if time.time() > _expires(self._record or {}):
                    self._lost.set()
                    log.error("could not renew the lease on %s before it expired: %s", self.url,
                              redact_text(str(err)))
                    break
                log.warning("renewing the lease on %s failed, trying again: %s", self.url, redact_text(str(err)))
        if self.lost and self._installed and not self._stop.is_set():  # not while releasing
            signal.pthread_kill(threading.main_thread().ident, LOST_SIGNAL)

    def _stop_renewal(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    def _new_record(self) -> dict:
        now = time.time()
        return {**self.info, "started": self._started, "renewed": _iso(now), "expires": now + self.ttl,
                "expires_at": _iso(now + self.ttl), "ttl": self.ttl}

    def _wrote(self, record: dict, token) -> None:
        self._record, self._token = record, token

    def _describe(self, held: dict) -> str:
        left = _expires(held) - time.time()
        return (f"{self.url} is held by job {held.get('job_id') or '?'} (host {held.get('host', '?')}, "
                f"pid {held.get('pid', '?')}, holder {str(held.get('holder', '?'))[:8]}) since "
                f"{held.get('started', '?')}, until {held.get('expires_at', '?')} "
                f"({'in %.0f s' % left if left >= 0 else 'expired'}); another job is writing this output: "
                f"wait for it to finish or stop it")


def _store_for(storage: Storage, key: str):
    if storage.protocol in S3_PROTOCOLS:
        return _S3Store(storage, key)
    if storage.is_local:
        return _FileStore(storage, key, locked=True)
    log.warning("%s offers no conditional writes: the lease on %s is advisory", storage.protocol,
                redact_text(storage.url(key)))
    return _FileStore(storage, key, locked=False)


class _S3Store:
    """The lease object on S3, every change conditional on its ETag."""

    def __init__(self, storage: Storage, key: str):
        self.fs = storage.fs
        self.bucket, self.key, _ = self.fs.split_path(storage.path(key))

    def create(self, body: bytes) -> str:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, IfNoneMatch="*")["ETag"]
        except Exception as exc:
            if isinstance(exc, FileExistsError) or s3_error_code(exc) in _CONFLICT_CODES:
                raise FileExistsError(self.key) from exc
            raise

    def read(self) -> tuple[dict, str] | None:
        """The lease and its ETag from one GET (a HEAD then a GET could pair one version's body with another's
        ETag); None when there is none."""
        async def get():
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            body, etag = sync(self.fs.loop, get)
        except FileNotFoundError:
            return None
        return _loads(body), etag

    def replace(self, body: bytes, etag: str) -> str:
        try:
            return self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, IfMatch=etag)["ETag"]
        except Exception as exc:
            _raise_conflict(exc)

    def delete(self, etag: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except Exception as exc:
            _raise_conflict(exc)


def _raise_conflict(exc: BaseException):
    if isinstance(exc, FileNotFoundError) or s3_error_code(exc) in _CONFLICT_CODES:
        raise _Conflict(str(exc)) from exc
    raise exc


class _FileStore:
    """The lease as a file; the token is its bytes. ``locked``: every step inside a filelock, so that the
    compare and the swap are one atomic step (local disks, NFS with working locks)."""

    def __init__(self, storage: Storage, key: str, locked: bool):
        self.storage, self.key = storage, key
        self.fs, self.path = storage.fs, storage.path(key)
        if locked:
            self.fs.makedirs(storage.path(), exist_ok=True)
        self.lock = FileLock(self.path + ".lock", timeout=60) if locked else nullcontext()
        self.local = locked

    def create(self, body: bytes) -> bytes:
        with self.lock:
            if self.local:
                with open(self.path, "xb") as f:  # raises FileExistsError
                    f.write(body)
            elif self.fs.exists(self.path):
                raise FileExistsError(self.path)
            else:
                self.storage.write_bytes(self.key, body)
        return body

    def read(self) -> tuple[dict, bytes] | None:
        with self.lock:
            body = self._bytes()
        return None if body is None else (_loads(body), body)

    def replace(self, body: bytes, token: bytes) -> bytes:
        with self.lock:
            if self._bytes() != token:
                raise _Conflict(self.path)
            self.storage.write_bytes(self.key, body)  # tmp file + rename on local disks
        return body

    def delete(self, token: bytes) -> None:
        with self.lock:
            if self._bytes() != token:
                raise _Conflict(self.path)
            self.fs.rm_file(self.path)  # the exact key: s3fs's rm expands [ ] and * as a glob

    def _bytes(self) -> bytes | None:
        try:
            return self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None


def _dumps(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def _loads(body: bytes) -> dict:
    """The lease record; {} for an unreadable one (treated as stale, so a damaged lease never blocks forever)."""
    try:
        record = json.loads(body)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _expires(record: dict) -> float:
    try:
        return float(record.get("expires", 0.0))
    except (TypeError, ValueError):
        return 0.0


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
