"""Error classes: real exception objects from each library (and through s3fs's translation) map to the class
their cause deserves; retries back off and stop at permanent errors; messages carry no credentials."""
import errno
import logging

import aiohttp
import botocore.exceptions as bex
import pytest
import ray.exceptions
import torch
from multidict import CIMultiDict
from yarl import URL
from s3fs.errors import translate_boto_error

from pipeline import errors
from pipeline.decode import ImageError
from pipeline.errors import (PERMANENT, TRANSIENT, classify, is_out_of_memory, is_transient, poisons_cuda, retry,
                             s3_error_code)


class Kinded(Exception):
    """An error that names its own kind, like the pipeline's read and decode errors (``kind``, and optionally a
    declared ``error_class``)."""

    def __init__(self, kind: str, message: str, error_class: str | None = None):
        super().__init__(message)
        self.kind = kind
        if error_class:
            self.error_class = error_class


def http_error(status: int, url: str = "https://bucket.s3.amazonaws.com/k.jpg") -> aiohttp.ClientResponseError:
    info = aiohttp.RequestInfo(URL(url), "GET", CIMultiDict(), URL(url))
    return aiohttp.ClientResponseError(info, (), status=status, message="HTTP error")


def client_error(code: str, status: int, op: str = "GetObject") -> bex.ClientError:
    return bex.ClientError({"Error": {"Code": code, "Message": f"{code} happened"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, op)


S3_CASES = [
    ("SlowDown", 503, TRANSIENT), ("ServiceUnavailable", 503, TRANSIENT), ("InternalError", 500, TRANSIENT),
    ("RequestTimeout", 400, TRANSIENT), ("Throttling", 400, TRANSIENT), ("OperationAborted", 409, TRANSIENT),
    ("ExpiredToken", 400, TRANSIENT), ("502", 502, TRANSIENT), ("ConditionalRequestConflict", 409, TRANSIENT),
    ("AccessDenied", 403, PERMANENT), ("NoSuchKey", 404, PERMANENT), ("NoSuchBucket", 404, PERMANENT),
    ("InvalidRange", 416, PERMANENT), ("InvalidAccessKeyId", 403, PERMANENT),
]


@pytest.mark.parametrize("code,status,expected", S3_CASES)
def test_s3_codes_keep_their_class_through_s3fs_translation(code, status, expected):
    raw = client_error(code, status)
    translated = translate_boto_error(raw)  # what s3fs raises: OSError/PermissionError/FileNotFoundError ...
    assert translated is not raw and isinstance(translated, OSError)
    assert classify(raw).error_class == expected
    assert classify(translated).error_class == expected, (type(translated), translated)
    assert s3_error_code(translated) == code
    # and once more behind the decode stage's read error
    try:
        try:
            raise translated
        except OSError as exc:
            raise Kinded(f"Read:{type(exc).__name__}", f"cannot read s3://b/k.jpg: {exc}") from exc
    except Kinded as wrapped:
        info = classify(wrapped)
    assert info.error_class == expected and info.kind == f"Read:{type(translated).__name__}"


@pytest.mark.parametrize("exc,expected", [
    (bex.EndpointConnectionError(endpoint_url="https://s3.example"), TRANSIENT),
    (bex.ReadTimeoutError(endpoint_url="https://s3.example"), TRANSIENT),
    (bex.ConnectTimeoutError(endpoint_url="https://s3.example"), TRANSIENT),
    (bex.ConnectionClosedError(endpoint_url="https://s3.example"), TRANSIENT),
    (bex.ResponseStreamingError(error="reset"), TRANSIENT),
    (bex.NoCredentialsError(), PERMANENT),
    (bex.ParamValidationError(report="bad"), PERMANENT),
    (aiohttp.ServerDisconnectedError(), TRANSIENT),
    (aiohttp.ClientPayloadError("truncated body"), TRANSIENT),
    (http_error(503), TRANSIENT),
    (http_error(429), TRANSIENT),
    (http_error(404), PERMANENT),
    (ConnectionResetError(errno.ECONNRESET, "reset by peer"), TRANSIENT),
    (TimeoutError("timed out"), TRANSIENT),
    (MemoryError(), TRANSIENT),
    (OSError(errno.EIO, "I/O error"), TRANSIENT),
    (OSError(errno.ENOSPC, "No space left on device"), TRANSIENT),
    (OSError(errno.EINVAL, "Invalid argument"), PERMANENT),
    (OSError("no errno: cause unknown"), TRANSIENT),
    (FileNotFoundError(errno.ENOENT, "No such file"), PERMANENT),
    (PermissionError(errno.EACCES, "Permission denied"), PERMANENT),
    (ValueError("a bug"), PERMANENT),
    (ray.exceptions.ActorDiedError(), TRANSIENT),
    (ray.exceptions.WorkerCrashedError(), TRANSIENT),
    (ray.exceptions.OutOfMemoryError("killed by the memory monitor"), TRANSIENT),
])
def test_library_and_builtin_exceptions(exc, expected):
    assert classify(exc).error_class == expected, exc
    assert is_transient(exc) == (expected == TRANSIENT)


@pytest.mark.parametrize("kind", ["EmptyFile", "NotAnImage", "NotAnImage(html)", "CorruptImage", "DecompressionBomb"])
@pytest.mark.parametrize("error", [ImageError, Kinded])  # the decode stage's own, and any error with such a kind
def test_decode_kinds_are_permanent_even_with_an_io_looking_cause(kind, error):
    try:
        try:
            raise OSError("image file is truncated (3 bytes not processed)")  # PIL's own, no errno
        except OSError as cause:
            raise error(kind, "cannot decode") from cause
    except error as exc:
        info = classify(exc)
    assert (info.kind, info.error_class) == (kind, PERMANENT)


def test_max_pixels_above_pils_own_limit_is_honoured(monkeypatch):
    """A PNG header of 20,000 x 10,000 (200 M pixels: above twice PIL's limit, where Image.open itself refuses):
    refused at the default limit, and opened (then found truncated) when --max-pixels allows it."""
    import struct
    import zlib

    from PIL import Image

    from pipeline.decode import decode_image

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 10000, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    with pytest.raises(ImageError) as err:
        decode_image(png)
    assert err.value.kind == "DecompressionBomb"
    with pytest.raises(ImageError) as err:
        decode_image(png, max_pixels=10**9)
    assert err.value.kind == "CorruptImage"  # past the size checks: only the missing pixel data is wrong


@pytest.mark.parametrize("kind,expected", [("Read:OSError", TRANSIENT), ("Read:TimeoutError", TRANSIENT),
                                           ("Read:FileNotFoundError", PERMANENT), ("Read:PermissionError", PERMANENT),
                                           ("Read:ValueError", PERMANENT)])
def test_read_kinds_without_their_cause_fall_back_on_the_type_name(kind, expected):
    assert classify(Kinded(kind, "cannot read")).error_class == expected


def test_an_explicit_error_class_wins():
    exc = Kinded("CorruptImage", "truncated upload, still being written", error_class=TRANSIENT)
    assert classify(exc).error_class == TRANSIENT
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset")
        except OSError as cause:
            raise Kinded("Refine:Custom", "declared final", error_class=PERMANENT) from cause
    except Kinded as declared:
        assert classify(declared).error_class == PERMANENT


def test_cuda_out_of_memory_is_transient_and_recoverable():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    info = classify(oom, stage="Stage1")
    assert (info.kind, info.error_class) == ("Stage1:OutOfMemoryError", TRANSIENT)
    assert is_out_of_memory(oom) and not poisons_cuda(oom)
    launch_oom = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")
    assert is_out_of_memory(launch_oom) and not poisons_cuda(launch_oom) and is_transient(launch_oom)


DOCS = "https://docs.nvidia.com/cuda/cuda-runtime-api/group__CUDART__TYPES.html"


@pytest.mark.parametrize("message", [
    # the first two as torch 2.11 raised them on an H200 (torch.AcceleratorError, also on every later CUDA call)
    f"CUDA error: an illegal memory access was encountered\nSearch for `cudaErrorIllegalAddress' in {DOCS} for more",
    f"CUDA error: device-side assert triggered\nSearch for `cudaErrorAssert' in {DOCS} for more information.",
    "CUDA error: unspecified launch failure",
    "CUDA error: uncorrectable ECC error encountered",
    "CUDA error: misaligned address",
    "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k, ...)`",
])
def test_context_poisoning_cuda_errors(message):
    for exc in (RuntimeError(message), torch.AcceleratorError(message)):
        assert poisons_cuda(exc) and not is_out_of_memory(exc) and is_transient(exc)
    wrapped = RuntimeError("stage 1 failed")
    wrapped.__cause__ = torch.AcceleratorError(message)
    assert poisons_cuda(wrapped)


@pytest.mark.parametrize("exc", [ValueError("illegal memory access"), RuntimeError("shape mismatch"),
                                 torch.OutOfMemoryError("CUDA out of memory"), OSError(errno.EIO, "x")])
def test_other_errors_do_not_poison_cuda(exc):
    assert not poisons_cuda(exc)


def test_messages_carry_no_credentials():
    url = "https://user:hunter2@bucket.s3.amazonaws.com/a b.jpg?X-Amz-Credential=AKIAEXAMPLE%2F20250101&" \
          "X-Amz-Signature=deadbeef&X-Amz-Security-Token=tok123&versionId=7"
    for exc in (OSError(errno.EIO, f"cannot read {url}"),
                http_error(403, url),
                Kinded("Read:OSError", f"cannot read {url}: boom")):
        info = classify(exc, stage="Refine")
        for secret in ("hunter2", "AKIAEXAMPLE", "deadbeef", "tok123"):
            assert secret not in info.message and secret not in info.text, info.text
        assert "bucket.s3.amazonaws.com" in info.message and "versionId=7" in info.message
        assert info.text.startswith(f"{info.kind}: ") and info.kind.startswith("Refine:")


def test_retry_backs_off_exponentially_with_full_jitter_and_logs_redacted(monkeypatch, caplog):
    slept, bounds = [], []
    monkeypatch.setattr(errors, "sleep", slept.append)
    monkeypatch.setattr(errors, "uniform", lambda lo, hi: bounds.append((lo, hi)) or hi)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) <= 4:
            raise client_error("SlowDown", 503)
        return "done"

    with caplog.at_level(logging.WARNING, logger="pipeline.errors"):
        assert retry(flaky, attempts=6, base=1.0, cap=3.0, what="read s3://b/k?X-Amz-Signature=s3cret") == "done"
    assert len(calls) == 5
    assert bounds == [(0.0, 1.0), (0.0, 2.0), (0.0, 3.0), (0.0, 3.0)]  # base * 2**i, capped; uniform from 0
    assert slept == [1.0, 2.0, 3.0, 3.0]
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.errors"]
    assert len(lines) == 4 and all("SlowDown" in line and "s3://b/k" in line for line in lines)
    assert not any("s3cret" in line for line in lines)


def test_retry_raises_permanent_errors_at_once_and_transient_ones_after_the_last_attempt(monkeypatch):
    monkeypatch.setattr(errors, "sleep", lambda s: None)
    calls = []

    def denied():
        calls.append(1)
        raise translate_boto_error(client_error("AccessDenied", 403))

    with pytest.raises(PermissionError):
        retry(denied, attempts=5)
    assert len(calls) == 1

    calls.clear()

    def down():
        calls.append(1)
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    with pytest.raises(ConnectionResetError):
        retry(down, attempts=3)
    assert len(calls) == 3


def test_retry_sleeps_within_the_jitter_bounds(monkeypatch):
    slept = []
    monkeypatch.setattr(errors, "sleep", slept.append)
    with pytest.raises(TimeoutError):
        retry(lambda: (_ for _ in ()).throw(TimeoutError("t")), attempts=8, base=0.5, cap=4.0)
    assert len(slept) == 7
    assert all(0.0 <= s <= min(4.0, 0.5 * 2 ** i) for i, s in enumerate(slept))
    assert len(set(slept)) > 1  # jittered, not a fixed schedule


def test_the_feature_cache_keeps_no_group_whose_read_failed(monkeypatch, tmp_path):
    """A corrupt file is left out of the cached group (permanent: the same next time); a read that failed after
    the retries (transient) fails the group instead, or the cache would keep it without that image for good."""
    from pipeline import decode
    from pipeline.sample import write_sample

    write_sample(str(tmp_path), {"horse": 3})
    uris = sorted(str(p) for p in (tmp_path / "image" / "horse").iterdir())
    (tmp_path / "image" / "horse" / uris[1].rsplit("/", 1)[1]).write_bytes(b"not an image")
    row = {"key": "horse", "image_uris": uris}
    out = decode.decode_for_cache(row, {})
    assert out["ok"] == [True, False, True] and out["net"].shape == (2, 224, 224, 3)

    fetch = decode._fetch
    monkeypatch.setattr(decode, "_fetch", lambda uri, options: TimeoutError("read timed out") if uri == uris[2]
                        else fetch(uri, options))
    with pytest.raises(RuntimeError, match=r"1 of the group's 3 reads failed .*horse_002.jpg: read timed out") as err:
        decode.decode_for_cache(row, {})
    assert is_transient(err.value)


def test_a_failed_mask_write_is_transient_while_the_same_error_on_an_input_stays_permanent(tmp_path):
    """The output's failures (a file where the group folder goes, access denied, a read-only mount) are not the
    image's: a re-run once the output is fixed must redo the row. Reading an input that fails so stays permanent."""
    from pipeline.refine import write_mask
    from pipeline.storage import Storage

    out = Storage(str(tmp_path))
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "g").write_text("in the way")
    with pytest.raises(OSError) as failed:
        write_mask(out, "masks/g/a.png", b"png")
    assert classify(failed.value, "Refine").error_class == TRANSIENT
    with pytest.raises(OSError) as read:
        (tmp_path / "masks" / "g" / "a.png").read_bytes()
    assert classify(read.value, "Read").error_class == PERMANENT
