"""Error classes: is a failure *permanent* (the same input fails the same way again) or *transient* (a later
try may succeed)? Error rows carry the class, a re-run redoes exactly the transient ones, and ``retry`` retries
only those.

The decisions, one line each (first match wins, walking ``exc`` and its ``__cause__`` chain):

- an explicit ``error_class`` attribute on the exception: the raiser knew best.
- decode kinds EmptyFile, NotAnImage, NotAnImage(html), CorruptImage, DecompressionBomb: permanent, the bytes
  themselves are bad and the same bytes fail again (an object replaced since is new input, not a retry).
- CUDA out-of-memory (``torch.OutOfMemoryError``, "CUDA out of memory"): transient, it depends on what else
  was resident; a smaller batch or another GPU succeeds.
- CUDA errors that poison the context (``poisons_cuda``): transient, a fresh process (maybe on another GPU)
  can succeed; the caller must also end the process.
- S3 error codes (botocore ``ClientError``, also found as the ``__cause__`` of s3fs's translated
  ``OSError``/``PermissionError``/``FileNotFoundError``): throttling (SlowDown, Throttling ...), 5xx,
  RequestTimeout, OperationAborted, ConditionalRequestConflict and expired session tokens are transient;
  everything else is permanent, notably
  * 403 AccessDenied: permanent, retrying with the same credentials cannot succeed, and a transient class would
    keep ``_SUCCESS`` from ever being written for a bucket with a few private objects;
  * 404 NoSuchKey (an object deleted between listing and reading): permanent, S3 reads are strongly consistent
    so a 404 means the object is gone, and a re-run that lists again will not see it.
- connection failures, resets and timeouts (builtins, botocore, aiohttp, urllib3, fsspec): transient.
- host ``MemoryError`` and Ray's lost workers, actors, nodes and objects: transient (the work can run again).
- credential and parameter errors of botocore (NoCredentialsError, ParamValidationError): permanent, a
  configuration error that only a person fixes.
- ``FileNotFoundError``, ``PermissionError``, ``IsADirectoryError``, ``NotADirectoryError``: permanent.
- other ``OSError``: by errno (EIO, EBUSY, EREMOTEIO, ENOSPC, ESTALE ... transient; EINVAL, ENAMETOOLONG ...
  permanent); an ``OSError`` without errno is an I/O failure whose cause we cannot see: transient, redoing one
  read is cheap.
- anything else (ValueError, a bug): permanent, the same code on the same input fails again.

Library exceptions are recognised by module and class name so that this module imports neither botocore,
aiohttp nor torch (CPU workers may not have torch loaded).
"""
from __future__ import annotations

import errno
import logging
import sys
from dataclasses import dataclass
from random import uniform
from time import sleep
from typing import Callable, Iterator, TypeVar

from .storage import redact_text

PERMANENT, TRANSIENT = "permanent", "transient"

log = logging.getLogger(__name__)
T = TypeVar("T")

# Kinds of pipeline.decode.ImageError raised on the bytes themselves.
PERMANENT_KINDS = frozenset({"EmptyFile", "NotAnImage", "NotAnImage(html)", "CorruptImage", "DecompressionBomb"})

# S3 error codes worth another try: botocore's throttling and transient lists (botocore.retries.standard) plus
# S3's own 5xx codes, concurrent-conditional-write conflicts and session tokens that the provider refreshes.
TRANSIENT_CODES = frozenset({
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException", "TooManyRequestsException",
    "ProvisionedThroughputExceededException", "TransactionInProgressException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "LimitExceededException", "RequestThrottled", "SlowDown", "PriorRequestNotComplete",
    "EC2ThrottledException", "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "OperationAborted", "ConditionalRequestConflict", "ExpiredToken", "TokenRefreshRequired", "RequestTimeTooSkewed",
})
TRANSIENT_STATUS = frozenset({408, 429})  # and every 5xx

# Exceptions by top-level module and class name (any class in the MRO).
TRANSIENT_NAMES = {
    "builtins": {"TimeoutError", "ConnectionError", "MemoryError", "BlockingIOError", "InterruptedError"},
    "socket": {"timeout"},
    "asyncio": {"TimeoutError"},
    "concurrent": {"TimeoutError"},
    "http": {"IncompleteRead", "RemoteDisconnected"},
    "botocore": {"HTTPClientError", "ConnectionError", "ResponseStreamingError", "IncompleteReadError",
                 "ResponseParserError"},  # HTTPClientError covers EndpointConnectionError, ReadTimeoutError ...
    "aiohttp": {"ClientConnectionError", "ClientPayloadError", "ServerTimeoutError"},
    "urllib3": {"ProtocolError", "TimeoutError", "NewConnectionError"},
    "fsspec": {"FSTimeoutError"},
    "torch": {"OutOfMemoryError"},
    "ray": {"RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
            "ObjectFetchTimedOutError", "GetTimeoutError", "LocalRayletDiedError", "RaySystemError",
            "OutOfMemoryError", "TaskCancelledError", "ActorUnavailableError"},
}
PERMANENT_NAMES = {
    "builtins": {"FileNotFoundError", "PermissionError", "IsADirectoryError", "NotADirectoryError",
                 "FileExistsError"},
    "botocore": {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "NoRegionError",
                 "UnknownSignatureVersionError"},
}
TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EIO", "EBUSY", "EREMOTEIO", "EAGAIN", "EINTR", "ETIMEDOUT", "ECONNRESET", "ECONNREFUSED", "ECONNABORTED",
        "EPIPE", "ENETUNREACH", "ENETDOWN", "ENETRESET", "EHOSTUNREACH", "EHOSTDOWN", "ENOSPC", "EDQUOT",
        "EMFILE", "ENFILE", "ENOMEM", "ENOBUFS", "ESTALE",
    ) if hasattr(errno, name)
)

# CUDA errors after which the context is unusable ("the process must be terminated and relaunched", CUDA runtime
# API docs), as they appear in torch's messages; out-of-memory is not among them.
CUDA_STICKY = (
    "illegal memory access", "unspecified launch failure", "device-side assert", "illegal instruction",
    "misaligned address", "invalid program counter", "hardware stack error", "launch timed out",
    "uncorrectable ecc error", "uncorrectable nvlink error", "not supported on global/shared address space",
    "context is destroyed", "gpu is lost", "busy or unavailable", "cuda error: unknown error",
    "cublas_status_execution_failed", "cudnn_status_execution_failed", "cudnn_status_mapping_error", "xid",
)
OOM_MESSAGES = ("cuda out of memory", "cuda error: out of memory", "cublas_status_alloc_failed",
                "mps backend out of memory")


@dataclass(frozen=True)
class ErrorInfo:
    """What an error row records: ``kind`` ("Read:OSError", "CorruptImage", "Stage1:OutOfMemoryError"),
    ``error_class`` (PERMANENT or TRANSIENT) and ``message`` with every URL and credential redacted."""

    kind: str
    error_class: str
    message: str

    @property
    def transient(self) -> bool:
        return self.error_class == TRANSIENT

    @property
    def text(self) -> str:
        """The error column: "kind: message"."""
        return f"{self.kind}: {self.message}"


def classify(exc: BaseException, stage: str = "") -> ErrorInfo:
    """The row for ``exc``; ``stage`` ("Read", "Stage1", "Refine") prefixes the kind."""
    base = getattr(exc, "kind", None) or type(exc).__name__
    kind = f"{stage}:{base}" if stage else base
    return ErrorInfo(kind, _error_class(exc), redact_text(_text(exc)))


def is_transient(exc: BaseException) -> bool:
    return _error_class(exc) == TRANSIENT


def poisons_cuda(exc: BaseException) -> bool:
    """True for CUDA errors after which this process can run no more CUDA work (illegal address, launch failure,
    device-side assert, ECC/Xid ...): the process must exit so that Ray starts a fresh one. Out-of-memory is
    recoverable and returns False."""
    for link in _chain(exc):
        text = _text(link).lower()
        if not _is_oom(link) and any(s in text for s in CUDA_STICKY) and (
                "cuda" in text or "cublas" in text or "cudnn" in text or _is(link, "torch", "AcceleratorError")):
            return True
    return False


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA (or MPS) out-of-memory anywhere in the chain: retry with smaller batches."""
    return any(_is_oom(link) for link in _chain(exc))


def retry(fn: Callable[[], T], *, attempts: int = 5, base: float = 0.2, cap: float = 10.0, what: str = "") -> T:
    """Calls ``fn`` until it returns, retrying transient errors up to ``attempts`` calls in all, with exponential
    backoff and full jitter (sleep uniform in [0, min(cap, base * 2**i)]); a permanent error, or the last
    transient one, is raised. One redacted log line per retry. Hand-written because it is ten lines and the
    retry libraries (tenacity, backoff) would be one more dependency on every Ray worker and GPU image."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not is_transient(exc):
                raise
            delay = uniform(0.0, min(cap, base * 2 ** (attempt - 1)))
            info = classify(exc)
            log.warning("retry %d/%d%s in %.2fs after %s", attempt, attempts - 1,
                        f" of {redact_text(what)}" if what else "", delay, info.text)
            sleep(delay)
    raise AssertionError("unreachable")


def s3_error_code(exc: BaseException) -> str | None:
    """The S3 error code ("SlowDown", "PreconditionFailed", "404" ...) of a botocore ClientError in the chain,
    also behind s3fs's translated exceptions; None when there is none."""
    for link in _chain(exc):
        error = _client_error(link)
        if error is not None:
            return str(error.get("Code") or "") or None
    return None


def _error_class(exc: BaseException) -> str:
    chain = list(_chain(exc))
    for link in chain:
        explicit = getattr(link, "error_class", None)
        if explicit in (PERMANENT, TRANSIENT):
            return explicit
    if getattr(exc, "kind", None) in PERMANENT_KINDS:
        return PERMANENT
    if any(_is_oom(link) for link in chain) or poisons_cuda(exc):
        return TRANSIENT
    for link in chain:
        status = _http_status(link)
        if status is not None:
            return status
    for link in chain:
        named = _by_name(link)
        if named:
            return named
    for link in chain:
        if isinstance(link, OSError):
            if link.errno is None:
                return TRANSIENT
            return TRANSIENT if link.errno in TRANSIENT_ERRNOS else PERMANENT
    kind = getattr(exc, "kind", None)
    if kind and ":" in kind and exc.__cause__ is None:  # e.g. "Read:OSError" raised without its cause
        return _by_type_name(kind.rsplit(":", 1)[1])
    return PERMANENT


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error it describes
        return type(exc).__name__


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def _is(exc: BaseException, module: str, name: str) -> bool:
    return any(c.__name__ == name and c.__module__.split(".")[0] == module for c in type(exc).__mro__)


def _is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")  # if torch is not loaded, this cannot be a torch error
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(s in _text(exc).lower() for s in OOM_MESSAGES)


def _client_error(exc: BaseException) -> dict | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and isinstance(response.get("Error"), dict):
        return response["Error"]
    return None


def _http_status(exc: BaseException) -> str | None:
    """The class from an S3 error response (botocore ClientError) or an HTTP status (aiohttp)."""
    error = _client_error(exc)
    if error is not None:
        code = str(error.get("Code") or "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if not status and code.isdigit():
            status = int(code)
        transient = code in TRANSIENT_CODES or (status or 0) >= 500 or status in TRANSIENT_STATUS
        return TRANSIENT if transient else PERMANENT
    if _is(exc, "aiohttp", "ClientResponseError") and isinstance(getattr(exc, "status", None), int):
        return TRANSIENT if exc.status >= 500 or exc.status in TRANSIENT_STATUS else PERMANENT
    return None


def _by_name(exc: BaseException) -> str | None:
    for cls in type(exc).__mro__:
        module = cls.__module__.split(".")[0]
        if cls.__name__ in TRANSIENT_NAMES.get(module, ()):
            return TRANSIENT
        if cls.__name__ in PERMANENT_NAMES.get(module, ()):
            return PERMANENT
    return None


def _by_type_name(name: str) -> str:
    for table, error_class in ((TRANSIENT_NAMES, TRANSIENT), (PERMANENT_NAMES, PERMANENT)):
        if any(name in names for names in table.values()):
            return error_class
    return TRANSIENT if name in ("OSError", "IOError") else PERMANENT


class Refusals:
    """A job's checks before its work (settings, input, weights, lease, cluster, output settings), as a context
    manager (or an ExitStack's exit callback): an exception raised inside while ``working`` is False gets
    ``before_work = True``, which the CLIs print as one line (URLs redacted) and exit 2 on. One raised once the
    work has started keeps its traceback."""

    working = False

    def __enter__(self) -> "Refusals":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if isinstance(exc, Exception) and not self.working:
            exc.before_work = True
        return False
