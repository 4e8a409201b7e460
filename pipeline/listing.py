"""Stage 0: what is there to do. Lists the input into groups of images (with ground truth where it exists).

Three input forms:
  * the CoSOD layout   <root>/image/<group>/<name>.<ext>  [+ <root>/groundtruth/<group>/<stem>.png]
  * groups directly    <root>/<group>/<name>.<ext>
  * a manifest         Parquet or CSV with columns group, image_uri [, gt_uri]

Every file found is an input (hidden dot-files such as .DS_Store aside), so a file that is not an image comes out as an error row
rather than vanishing.
"""
from __future__ import annotations

import io
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field

import pandas as pd

from .storage import Storage, open_url, safe_component


@dataclass
class ImageSpec:
    image_uri: str
    gt_uri: str | None
    name: str  # path of the image inside its group folder (or the manifest file name)
    mask_key: str = ""  # masks/<group>/<stem>.png, filled in by assign_mask_keys


@dataclass
class GroupSpec:
    group: str
    images: list[ImageSpec] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The group's safe name under --output (masks/<key>/, predictions/<key>-...)."""
        return safe_component(self.group)


def _hidden(path: str) -> bool:
    # Hidden files (.DS_Store, ._AppleDouble) are not inputs; folders are, whatever their names.
    return posixpath.basename(path).startswith(".")


def _stem(name: str) -> str:
    base, ext = posixpath.splitext(name)
    return base if ext else name


def _relative(path: str, root: str) -> str:
    # Not posixpath.relpath: it would resolve a literal ".." in an object key (legal in S3) into a parent.
    return path[len(root):].lstrip("/")


def list_layout(storage: Storage) -> list[GroupSpec]:
    """Lists a CoSOD-layout root (image/ + groundtruth/) or a root of group folders. A group folder with no
    file is kept as an empty group (it yields no rows, and the run records it)."""
    fs = storage.fs
    if fs.isdir(storage.path("image")):
        image_root, gt_root = storage.path("image"), storage.path("groundtruth")
    else:
        image_root, gt_root = storage.base, None
    # keys ending in "/" are folder markers that object stores keep for empty folders, not files
    files = [p for p in fs.find(image_root) if not p.endswith("/") and not _hidden(_relative(p, image_root))]
    folders = [_relative(e["name"], image_root).rstrip("/") for e in fs.ls(image_root, detail=True)
               if e["type"] == "directory"]
    gts: dict[str, str] = {}
    if gt_root and fs.isdir(gt_root):
        for p in fs.find(gt_root):
            rel = _relative(p, gt_root)
            if not p.endswith("/") and not _hidden(rel):
                gts.setdefault(_stem(rel), p)  # <group>/<stem> -> path (first extension wins: .png sorts early)
    groups: dict[str, GroupSpec] = {name: GroupSpec(name) for name in folders if name}
    for p in sorted(files):
        rel = _relative(p, image_root)
        group, _, name = rel.partition("/") if "/" in rel else ("", "", rel)
        spec = groups.setdefault(group, GroupSpec(group))
        gt = gts.get(f"{group}/{_stem(name)}" if group else _stem(name))
        spec.images.append(ImageSpec(fs.unstrip_protocol(p), fs.unstrip_protocol(gt) if gt else None, name))
    return finish(list(groups.values()))


def list_manifest(url: str, options: dict) -> list[GroupSpec]:
    """Reads a manifest (Parquet, or CSV by extension) with columns group, image_uri [, gt_uri]."""
    fs, path = open_url(url, options)
    data = fs.cat_file(path)
    folder = Storage(fs.unstrip_protocol(posixpath.dirname(path)), options)
    frame = pd.read_csv(io.BytesIO(data)) if url.lower().endswith((".csv", ".csv.gz")) else pd.read_parquet(io.BytesIO(data))
    missing = {"group", "image_uri"} - set(frame.columns)
    if missing:
        raise ValueError(f"manifest {url}: missing column(s) {sorted(missing)}; needs group, image_uri [, gt_uri]")
    groups: dict[str, GroupSpec] = {}
    for row in frame.itertuples(index=False):
        group = "" if pd.isna(row.group) else str(row.group)
        image_uri = _resolve(str(row.image_uri), folder)
        gt = getattr(row, "gt_uri", None)
        gt_uri = None if gt is None or pd.isna(gt) or str(gt) == "" else _resolve(str(gt), folder)
        spec = groups.setdefault(group, GroupSpec(group))
        spec.images.append(ImageSpec(image_uri, gt_uri, posixpath.basename(image_uri.split("?")[0])))
    return finish(list(groups.values()))


def _resolve(uri: str, manifest_dir: Storage) -> str:
    # Relative entries are relative to the manifest's folder.
    return uri if "://" in uri or uri.startswith("/") else manifest_dir.url(uri)


def finish(groups: list[GroupSpec]) -> list[GroupSpec]:
    """Sorts groups and images and gives every image a unique, safe mask key."""
    groups.sort(key=lambda g: g.group)
    keys: dict[str, str] = {}
    for spec in groups:
        if spec.key in keys and keys[spec.key] != spec.group:  # impossible by construction; guard anyway
            raise ValueError(f"groups {spec.group!r} and {keys[spec.key]!r} map to the same output folder")
        keys[spec.key] = spec.group
        spec.images.sort(key=lambda im: im.image_uri)
        assign_mask_keys(spec)
    return groups


def assign_mask_keys(spec: GroupSpec) -> None:
    """masks/<group>/<stem>.png; stems shared by several files (a.jpg, a.png) keep their extension."""
    stems = [_stem(im.name) for im in spec.images]
    counts = defaultdict(int)
    for s in stems:
        counts[s] += 1
    used: set[str] = set()
    for im, stem in zip(spec.images, stems):
        name = im.name.replace(".", "_") if counts[stem] > 1 else stem
        parts = [safe_component(p) for p in name.split("/") if p]
        key = posixpath.join("masks", spec.key, *parts)
        candidate, n = key, 1
        while candidate in used:  # the same file listed twice in a manifest
            candidate, n = f"{key}~{n}", n + 1
        used.add(candidate)
        im.mask_key = candidate + ".png"
