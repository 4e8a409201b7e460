"""Decode (CPU tasks): read a group's images from storage and turn each into the two 224x224 views the method needs.

One group row in, the same row out with, per image, a status and (when it decoded) the network's view (PIL
bilinear) and the CRF's colour view (OpenCV bilinear), both (224, 224, 3) uint8. A file that cannot be read or
decoded becomes an error for that image only (with its class: permanent or transient); the rest of its group goes
on. Bytes are fetched a few files ahead and decoded one by one, so a group's encoded files are never all in
memory. Groups larger than ``row_images`` pass through undecoded: the stage-1 actor reads those itself in
micro-batches (a decoded row of thousands of images would be gigabytes).
"""
from __future__ import annotations

import io
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from scosparc_core.image import INPUT_SIZE, crf_image, network_pixels, to_rgb

from .errors import PERMANENT, TRANSIENT, classify
from .storage import open_url, redact_url

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit
FAST_DECODE_SIZE = 2 * INPUT_SIZE  # JPEG DCT scaling keeps at least twice the network's resolution
VIEW = (INPUT_SIZE, INPUT_SIZE, 3)


@dataclass(frozen=True)
class DecodeSettings:
    """storage_options: fsspec options; max_pixels: larger images are error rows; fast_decode: JPEG draft mode
    (DCT scaling to >= 448 px, much faster for large photos; it changes the resize input, so it is off by
    default); row_images: groups with more images are decoded by the stage-1 actor; fetch_ahead: files read
    ahead of the one being decoded."""

    storage_options: dict = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS
    fast_decode: bool = False
    row_images: int = 32
    fetch_ahead: int = 8


class ImageError(Exception):
    """An input image that cannot be used; ``kind`` is what the error row reports; the bytes are bad, so it is
    permanent."""

    error_class = PERMANENT

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class ReadError(Exception):
    """An object that could not be read (after the storage client's retries); its class is its cause's."""

    def __init__(self, uri: str, cause: BaseException):
        super().__init__(f"cannot read {redact_url(uri)}: {cause}")
        self.kind = f"Read:{type(cause).__name__}"


def error_kind(exc: BaseException) -> str:
    return getattr(exc, "kind", None) or type(exc).__name__


def _fetch(uri: str, options: dict) -> bytes | BaseException:
    try:
        fs, path = open_url(uri, options)
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - reported per image
        return exc


def iter_bytes(uris: list[str], options: dict, ahead: int = 8) -> Iterator[bytes | BaseException]:
    """The objects' bytes in order, fetched ``ahead`` at a time (object-store latency dominates); each failure
    is yielded in place. At most ``ahead`` + 1 files are in memory."""
    if len(uris) <= 1:
        yield from (_fetch(u, options) for u in uris)
        return
    with ThreadPoolExecutor(min(ahead, len(uris))) as pool:
        pending = [pool.submit(_fetch, u, options) for u in uris[:ahead]]
        for i in range(len(uris)):
            if i + ahead < len(uris):
                pending.append(pool.submit(_fetch, uris[i + ahead], options))
            yield pending[i].result()
            pending[i] = None  # the bytes go as soon as they are decoded


def read_many(uris: list[str], options: dict, threads: int = 16) -> list[bytes | BaseException]:
    """Fetches small objects (ground truth, masks) concurrently; each failure is returned in place."""
    return list(iter_bytes(uris, options, threads))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, fast: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Encoded bytes -> (network pixels (224, 224, 3) uint8, CRF pixels (224, 224, 3) uint8, height, width).

    Height and width are the original image's (after EXIF rotation), whatever ``fast`` decodes.
    """
    if not data:
        raise ImageError("EmptyFile", "file is empty (0 bytes)")
    # PIL refuses images above twice its own limit while opening them, before our check: a --max-pixels above
    # that would not be honoured. Its limit only ever rises, to ours (images above it fail our check anyway).
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise ImageError("DecompressionBomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
            if fast and image.format == "JPEG":
                image.draft("RGB", (FAST_DECODE_SIZE, FAST_DECODE_SIZE))
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("DecompressionBomb", str(exc)) from exc
    except Image.UnidentifiedImageError as exc:
        head = data[:64].lstrip().lower()
        kind = "NotAnImage(html)" if head.startswith((b"<!doctype html", b"<html")) else "NotAnImage"
        raise ImageError(kind, f"not a decodable image ({len(data)} bytes, starts {data[:8]!r})") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError("CorruptImage", f"cannot decode: {exc}") from exc
    turned = image.getexif().get(0x0112, 1) in (5, 6, 7, 8)  # EXIF orientations that swap the axes
    rgb = to_rgb(image)
    if turned:
        w, h = h, w
    return network_pixels(rgb), crf_image(rgb), h, w


def read_gt(data) -> np.ndarray:
    """Ground-truth bytes -> (H, W) uint8 0/255; RGB, palette and 16-bit masks are normalised (>128 = object)."""
    from scosparc_core.metrics import gt_to_mask  # here: decode tasks that read no ground truth skip pysodmetrics

    if isinstance(data, BaseException):
        raise data
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return gt_to_mask(np.asarray(image))
    return gt_to_mask(np.asarray(image.convert("L")))


@dataclass
class Decoded:
    """A range of a group's images: ok (n,) bool, errors as (kind, class, text) or None, original heights and
    widths, and both views (n, 224, 224, 3) uint8 (zeros where the image failed), or None when not kept."""

    ok: np.ndarray
    errors: list
    height: np.ndarray
    width: np.ndarray
    net: np.ndarray | None
    crf: np.ndarray | None

    @classmethod
    def undecoded(cls, n: int) -> "Decoded":
        """A group left to the stage-1 actor: no status yet, no views."""
        empty = np.zeros((0, *VIEW), np.uint8)
        return cls(np.zeros(n, bool), [None] * n, np.zeros(n, np.int32), np.zeros(n, np.int32), empty, empty)

    def error_columns(self) -> dict:
        """The rows' error, error_kind and error_class columns ("" where the image decoded)."""
        return {"error": [e[2] if e else "" for e in self.errors],
                "error_kind": [e[0] if e else "" for e in self.errors],
                "error_class": [e[1] if e else "" for e in self.errors]}


def decode_images(uris: list[str], settings: DecodeSettings, keep: bool = True) -> Decoded:
    """Reads and decodes ``uris`` in order; ``keep=False`` only learns which decode and their sizes."""
    n = len(uris)
    ok, errors = np.zeros(n, bool), [None] * n
    height, width = np.zeros(n, np.int32), np.zeros(n, np.int32)
    net = np.zeros((n, *VIEW), np.uint8) if keep else None
    crf = np.zeros((n, *VIEW), np.uint8) if keep else None
    for i, data in enumerate(iter_bytes(uris, settings.storage_options, settings.fetch_ahead)):
        try:
            if isinstance(data, BaseException):
                raise ReadError(uris[i], data) from data
            a, b, height[i], width[i] = decode_image(data, settings.max_pixels, settings.fast_decode)
        except Exception as exc:  # noqa: BLE001 - any failure is this image's error row
            info = classify(exc)
            errors[i] = (info.kind, info.error_class, info.text)
            continue
        ok[i] = True
        if keep:
            net[i], crf[i] = a, b
    return Decoded(ok, errors, height, width, net, crf)


def decode_group(row: dict, settings: DecodeSettings) -> dict:
    """Ray Data ``map`` over group rows. Adds per image: ok, error, error_kind, error_class, height, width; and,
    for groups of at most ``row_images`` images, ``net`` and ``crf`` (n, 224, 224, 3) uint8 (``decoded``)."""
    start = time.perf_counter()
    uris = list(row["image_uris"])
    small = len(uris) <= settings.row_images
    d = decode_images(uris, settings) if small else Decoded.undecoded(len(uris))
    return {**row, "decoded": small, "ok": d.ok, **d.error_columns(), "height": d.height, "width": d.width,
            "net": d.net, "crf": d.crf, "decode_s": time.perf_counter() - start}


def decode_network_views(uris: list[str], storage_options: dict, who: str, keep_going: bool = True
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Training's decode: (ok (n,) bool, the network views (n_ok, 224, 224, 3) uint8 of the images that decoded).
    Training has no error rows, so a bad file is logged and left out; ``keep_going=False``: a read that failed
    after the storage client's retries (transient) raises instead."""
    d = decode_images(uris, DecodeSettings(storage_options=storage_options))
    failed = [(uri, e) for uri, e in zip(uris, d.errors) if e]
    transient = [(uri, e) for uri, e in failed if e[1] == TRANSIENT]
    if transient and not keep_going:
        exc = RuntimeError(f"{len(transient)} of the group's {len(uris)} reads failed after the storage client's "
                           f"retries (first: {transient[0][1][2]}); run again")
        exc.error_class = TRANSIENT
        raise exc
    for uri, e in failed:
        print(f"[{who}] skipping {redact_url(uri)}: {e[0]}: {e[2]}", file=sys.stderr, flush=True)
    return d.ok, d.net[d.ok]


def decode_for_cache(row: dict, storage_options: dict) -> dict:
    """The feature cache's Ray Data ``map``: a group row (key, names, image_uris, sizes) -> plus ``ok`` per image
    and ``net``, the (n_ok, 224, 224, 3) uint8 network pixels of the images that decoded. A read that failed
    (transient) fails the pass: the cache would keep the group without that image for good. Here, not in
    ``feature_cache``, so the tasks skip torch and timm."""
    uris = [str(u) for u in row["image_uris"]]
    ok, net = decode_network_views(uris, storage_options, "feature-cache", keep_going=False)
    return {**row, "ok": ok.tolist(), "net": net}
