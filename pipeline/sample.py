"""A small synthetic CoSOD dataset with exact masks, built from the photos that ship with scikit-image.

Each group pastes one textured object (the skimage horse silhouette, or a disc) onto varied photo
backgrounds at random sizes and places, so the object is what the group has in common. It is what
``jobs/infer.py --sample`` writes and runs on, and the test data of this project.
"""
from __future__ import annotations

import io
import posixpath

import cv2
import numpy as np
from PIL import Image
from skimage import data as skdata

_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel")
_SIZES = ((240, 320), (300, 400), (256, 256), (375, 500), (480, 360), (200, 300))


def _shape(kind: str) -> np.ndarray:
    if kind == "horse":
        return ~skdata.horse()
    yy, xx = np.mgrid[:256, :256]
    return (yy - 128) ** 2 + (xx - 128) ** 2 <= 110**2


def _texture(kind: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = np.array([120, 72, 40] if kind == "horse" else [40, 90, 170], np.float32)
    noise = rng.normal(0, 18, size=(h, w, 1)).astype(np.float32)
    stripes = 25 * np.sin(np.arange(w, dtype=np.float32) / 6.0)[None, :, None]
    return np.clip(base + noise + stripes, 0, 255).astype(np.uint8)


def synthetic_image(kind: str, index: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 RGB image and its (H, W) uint8 0/255 mask."""
    rng = np.random.default_rng([seed, index, len(kind)])
    h, w = _SIZES[index % len(_SIZES)]
    photo = getattr(skdata, _BACKGROUNDS[(index + len(kind)) % len(_BACKGROUNDS)])()
    photo = photo if photo.ndim == 3 else np.repeat(photo[:, :, None], 3, axis=2)
    image = cv2.resize(np.ascontiguousarray(photo[:, :, :3]), (w, h), interpolation=cv2.INTER_AREA)
    shape = _shape(kind).astype(np.uint8)
    scale = rng.uniform(0.45, 0.75) * min(h / shape.shape[0], w / shape.shape[1])
    sh, sw = max(8, int(shape.shape[0] * scale)), max(8, int(shape.shape[1] * scale))
    obj = cv2.resize(shape, (sw, sh), interpolation=cv2.INTER_NEAREST).astype(bool)
    top, left = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
    mask = np.zeros((h, w), bool)
    mask[top : top + sh, left : left + sw] = obj
    image[mask] = _texture(kind, rng, h, w)[mask]
    return image, mask.astype(np.uint8) * 255


def synthetic_group(kind: str = "horse", n: int = 4, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    return [synthetic_image(kind, i, seed) for i in range(n)]


def write_sample(root: str, groups: dict[str, int] | None = None, seed: int = 0, storage_options=None) -> list[str]:
    """Writes ``<root>/image/<group>/<group>_NNN.jpg`` and ``<root>/groundtruth/<group>/<group>_NNN.png``.

    ``groups`` maps a group name to an image count; the name is an object kind ("horse" or "disc"), optionally
    followed by digits that pick other placements ("horse2"). Returns the image URLs written.
    """
    import fsspec

    groups = {"horse": 4, "disc": 3} if groups is None else groups
    fs, base = fsspec.core.url_to_fs(root, **(storage_options or {}))
    written = []
    for group, count in groups.items():
        kind = group.rstrip("0123456789")
        variant = int(group[len(kind):] or 0)
        for i, (rgb, mask) in enumerate(synthetic_group(kind, count, seed + 1000 * variant)):
            stem = f"{group}_{i:03d}"
            for sub, array, fmt, ext in (("image", rgb, "JPEG", "jpg"), ("groundtruth", mask, "PNG", "png")):
                path = posixpath.join(base, sub, group, f"{stem}.{ext}")
                buf = io.BytesIO()
                Image.fromarray(array).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
                fs.pipe_file(path, buf.getvalue())
            written.append(fs.unstrip_protocol(posixpath.join(base, "image", group, f"{stem}.jpg")))
    return written
