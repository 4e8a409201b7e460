"""Stage 1 of the pipeline (CPU tasks): read a group's images from storage and decode them.

One group row in, the same row out with, for each image, a status and (when it decoded) the two 224x224 uint8
views the method needs: the network's (PIL bilinear) and the CRF's (OpenCV bilinear). A file that cannot be
read or decoded becomes an error for that image only; the rest of its group goes on.
"""
from __future__ import annotations

import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from scosparc_core.image import INPUT_SIZE, crf_image, network_pixels, to_rgb

from .storage import open_url

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's decompression-bomb limit


class ImageError(Exception):
    """An input image that cannot be used; ``kind`` is what the error row reports."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def error_kind(exc: BaseException) -> str:
    return getattr(exc, "kind", None) or type(exc).__name__


def read_many(uris: list[str], options: dict, threads: int = 16) -> list[bytes | BaseException]:
    """Fetches objects concurrently (object-store latency dominates); each failure is returned in place."""

    def fetch(uri: str):
        try:
            fs, path = open_url(uri, options)
            return fs.cat_file(path)
        except Exception as exc:  # noqa: BLE001 - reported per image
            return exc

    if len(uris) <= 1:
        return [fetch(u) for u in uris]
    with ThreadPoolExecutor(min(threads, len(uris))) as pool:
        return list(pool.map(fetch, uris))


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Encoded bytes -> (network pixels (224, 224, 3) uint8, CRF pixels (224, 224, 3) uint8, height, width)."""
    if not data:
        raise ImageError("EmptyFile", "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w * h > max_pixels:
                raise ImageError("DecompressionBomb", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
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
    rgb = to_rgb(image)
    return network_pixels(rgb), crf_image(rgb), rgb.shape[0], rgb.shape[1]


def decode_group(row: dict, storage_options: dict, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Ray Data ``map`` over group rows. Adds per image: ok, error, error_kind, height, width; and for the images
    that decoded, ``net`` and ``crf`` stacks (n_ok, 224, 224, 3) uint8, in the order of ``ok``."""
    start = time.perf_counter()
    uris = list(row["image_uris"])
    n = len(uris)
    ok, errors, kinds = [False] * n, [""] * n, [""] * n
    heights, widths = [0] * n, [0] * n
    nets, crfs = [], []
    for i, data in enumerate(read_many(uris, storage_options)):
        try:
            if isinstance(data, BaseException):
                raise ImageError(f"Read:{type(data).__name__}", f"cannot read {uris[i]}: {data}")
            net, crf, heights[i], widths[i] = decode_image(data, max_pixels)
        except Exception as exc:  # noqa: BLE001 - any failure is this image's error row
            errors[i], kinds[i] = f"{error_kind(exc)}: {exc}", error_kind(exc)
            continue
        ok[i] = True
        nets.append(net)
        crfs.append(crf)
    empty = np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    return {
        **row,
        "ok": ok,
        "error": errors,
        "error_kind": kinds,
        "height": heights,
        "width": widths,
        "net": np.stack(nets) if nets else empty,
        "crf": np.stack(crfs) if crfs else empty,
        "decode_s": time.perf_counter() - start,
    }
