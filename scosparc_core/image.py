"""Turning whatever image a user has into the two 224x224 views the method reads.

The paper code opens every image with ``PIL.Image.open(...).convert('RGB')`` for the network and with
``cv2.imread`` for the CRF. ``to_rgb`` is the one place where odd inputs (EXIF rotation, alpha, palette,
CMYK, 16-bit, grayscale) become a plain ``(H, W, 3) uint8`` RGB array; both views are made from it.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageOps

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    # EXIF orientation first, as cv2.imread (the CRF's reader in the paper code) does.
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit integer: PIL's convert('RGB') clips at 255 and turns the picture white; scale instead.
        arr = np.asarray(image, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        return _gray_to_rgb(np.clip(arr * 255 // top, 0, 255).astype(np.uint8))
    if mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float32))
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        return _gray_to_rgb(np.clip(arr * scale, 0, 255).astype(np.uint8))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    # Alpha is dropped, not composited: this is what convert('RGB') does in the paper code.
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_rgb(image) -> np.ndarray:
    """Any PIL image or array -> ``(H, W, 3) uint8`` RGB.

    Arrays may be ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped), ``uint8`` or
    ``uint16`` (scaled by 1/257), or float in [0, 1]. Anything else raises ``ValueError``.
    """
    if isinstance(image, Image.Image):
        rgb = _pil_to_rgb(image)
    else:
        arr = np.asarray(image)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim == 2:
            arr = _gray_to_rgb(arr)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4):
            raise ValueError(f"expected an (H, W), (H, W, 3) or (H, W, 4) image array, got shape {arr.shape}")
        arr = arr[:, :, :3]
        if arr.dtype == np.uint8:
            rgb = np.ascontiguousarray(arr)
        elif arr.dtype == np.uint16:
            rgb = (arr.astype(np.uint32) * 255 // 65535).astype(np.uint8)
        elif np.issubdtype(arr.dtype, np.floating):
            rgb = (np.clip(np.nan_to_num(arr), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        else:
            raise ValueError(f"unsupported image dtype {arr.dtype}; use uint8, uint16 or float in [0, 1]")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"image has no pixels (shape {rgb.shape})")
    return rgb


def network_pixels(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(224, 224, 3) uint8``: the paper code's PIL bilinear resize."""
    resized = Image.fromarray(rgb).resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    return np.asarray(resized, dtype=np.uint8).copy()


def crf_image(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3) uint8`` -> ``(224, 224, 3) uint8``: the CRF's colour input (OpenCV bilinear resize)."""
    return np.ascontiguousarray(cv2.resize(rgb, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR))


def to_original_size(png224: np.ndarray, height: int, width: int) -> np.ndarray:
    """A ``(224, 224)`` uint8 mask -> ``(height, width)`` with OpenCV bilinear, as the paper code resizes its PNGs
    (edge pixels take in-between values)."""
    return cv2.resize(png224, (int(width), int(height)), interpolation=cv2.INTER_LINEAR)
