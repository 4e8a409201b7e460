"""Stage 0: what is there to do. Lists the input into groups of images (with ground truth where it exists).

Three input forms:
  * the CoSOD layout   <root>/image/<group>/<name>.<ext>  [+ <root>/groundtruth/<group>/<stem>.png]
  * groups directly    <root>/<group>/<name>.<ext>
  * a manifest         Parquet, CSV or gzip-compressed CSV with columns group, image_uri [, gt_uri]

Every file found is an input (hidden dot-files such as .DS_Store aside), so a file that is not an image comes out as an error row
rather than vanishing - unless the folders are listed with ``extensions`` (``--extensions jpg,png``: sidecar files
such as img2dataset's .json and .txt beside the images are then not inputs).

Two ways to run the same per-group functions: ``group_dataset`` (a Ray Data dataset, one row per group, for
inputs of millions of images: the driver lists only the group folder names, Ray tasks list the groups, a
manifest is read and grouped by Ray Data) and ``list_layout`` / ``list_manifest`` (plain lists on the driver,
for training and small inputs). Listings use filesystems without a listings cache, so nothing grows with the
input on the driver. On S3 a run of up to GROUPS_PER_RUN groups that are neighbours in key order is listed as
one range of keys (a ListObjectsV2 walk from the first group's prefix to the last's): one request or a few per
run rather than two or three per group; other filesystems list each group folder.
"""
from __future__ import annotations

import posixpath
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .storage import S3_PROTOCOLS, Storage, fs_options, redact_text, redact_url, safe_component

LAYOUTS = ("auto", "cosod", "groups")
IMAGE_DIR, GT_DIR = "image", "groundtruth"
# Folder names that hold images or masks rather than being groups (compared lower-case, without "_", "-", " ").
_NOT_GROUPS = {"img", "imgs", "image", "images", "rgb", "gt", "gts", "groundtruth", "groundtruths", "mask", "masks",
               "label", "labels", "annotation", "annotations", "anno", "annos", "seg", "segmentation",
               "segmentations", "saliency", "saliencymap", "saliencymaps"}
_GT_LIKE = _NOT_GROUPS - {"img", "imgs", "image", "images", "rgb"}

LIST_THREADS = 16  # concurrent group listings per task: object-store latency bounds a listing, not CPU
GROUPS_PER_TASK = 256  # group names per listing task: fewer, larger blocks make the summary and later stages cheaper
LIST_PAGE_KEYS = 1000  # keys per ListObjectsV2 page (S3's maximum)
# S3: neighbouring groups per walk of a range of keys. 4,000 groups of 25 images take ~1,100 list requests
# instead of two per group (8,000; S3 bills and throttles per request), and a run stays short enough that the
# pool's walks finish together when a few groups are large.
GROUPS_PER_RUN = 8
FIRST_PAGE_KEYS_PER_GROUP = 32
LIST_CPUS = 0.25  # a listing task waits on the network; it should not hold a core
MAX_SHUFFLE_PARTITIONS = 200  # Ray Data's default for a hash shuffle
MANIFEST_COLUMNS = ("group", "image_uri", "gt_uri")
PERCENTILES = (0.5, 0.9, 0.99)

ROW_SCHEMA = pa.schema([
    ("group", pa.string()), ("group_key", pa.string()), ("names", pa.list_(pa.string())),
    ("image_uris", pa.list_(pa.string())), ("gt_uris", pa.list_(pa.string())), ("mask_keys", pa.list_(pa.string())),
    ("image_bytes", pa.list_(pa.int64())), ("n_images", pa.int64()),
])


@dataclass(frozen=True)
class InputSpec:
    """Where the input is; travels to the Ray tasks that list it."""

    input: str | None = None  # CoSOD layout <root>/image/<group>/* [+ groundtruth/<group>/<stem>.*], or <root>/<group>/*
    manifest: str | None = None  # Parquet, CSV or CSV.gz with columns group, image_uri [, gt_uri]
    layout: str = "auto"  # auto | cosod | groups
    storage_options: dict = field(default_factory=dict)
    extensions: tuple[str, ...] = ()  # a folder layout's image files (lowercase, no dot); (): every file


@dataclass
class ImageSpec:
    image_uri: str
    gt_uri: str | None
    name: str  # path of the image inside its group folder (or the manifest file name)
    mask_key: str = ""  # masks/<group>/<stem>.png, filled in by assign_mask_keys
    size: int = -1  # bytes, from the listing; -1 when unknown (manifests)


@dataclass
class GroupSpec:
    group: str
    images: list[ImageSpec] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The group's safe name under --output (masks/<key>/; the ``group_key`` of its rows and records)."""
        return safe_component(self.group)


def _hidden(path: str) -> bool:
    # Hidden files (.DS_Store, ._AppleDouble) are not inputs; folders are, whatever their names.
    return posixpath.basename(path).startswith(".")


def _wanted(path: str, extensions: tuple[str, ...]) -> bool:
    """Whether an image file is an input under ``extensions`` (() takes every file)."""
    return not extensions or posixpath.splitext(path)[1].lower().lstrip(".") in extensions


def normal_extensions(text: str | tuple | list) -> tuple[str, ...]:
    """"jpg, .PNG" or ["jpg", ".PNG,webp"] -> ("jpg", "png", "webp"): lowercase, no leading dots, no blanks,
    sorted. Refused: one with a dot inside ("tar.gz": a file's extension is what follows its last dot), and a
    text that names none (callers take () as "every file" before asking)."""
    parts = [q for p in ([text] if isinstance(text, str) else list(text)) for q in str(p).split(",")]
    found = tuple(sorted({p.strip().lower().lstrip(".") for p in parts} - {""}))
    if not found:
        raise ValueError(f"extensions {text!r} name no file extension (e.g. jpg,png)")
    bad = [e for e in found if "." in e]
    if bad:
        raise ValueError(f"extension {bad[0]!r}: a file's extension is what follows its last dot (e.g. gz)")
    return found


def _stem(name: str) -> str:
    base, ext = posixpath.splitext(name)
    return base if ext else name


def _gt_preference(path: str) -> tuple[bool, str]:
    """Sort key of ground-truth files: of two with one stem (``a.png``, ``a.jpg``), the PNG is the mask."""
    return posixpath.splitext(path)[1].lower() != ".png", path


def _relative(path: str, root: str) -> str:
    # Not posixpath.relpath: it would resolve a literal ".." in an object key (legal in S3) into a parent.
    return path[len(root):].lstrip("/")


def _listing_fs(url: str, options: dict):
    """(filesystem, path) with the listings cache off: s3fs/gcsfs would otherwise keep every entry they ever
    listed for the life of the process (gigabytes for millions of objects)."""
    opts = fs_options(url, options)
    listing = {**opts, "use_listings_cache": False}
    if fsspec.core.split_protocol(url)[0] in S3_PROTOCOLS:  # botocore's pool (10) would queue LIST_THREADS
        listing["config_kwargs"] = {"max_pool_connections": LIST_THREADS, **opts.get("config_kwargs", {})}
    try:
        return fsspec.core.url_to_fs(url, **listing)
    except TypeError:  # a filesystem whose constructor takes no such option has no such cache
        return fsspec.core.url_to_fs(url, **opts)


def _is_dir(fs, entry: dict) -> bool:
    if entry["type"] == "directory":
        return True
    # a symlinked folder on a local disk lists as "other"
    return entry["type"] == "other" and bool(entry.get("islink")) and fs.isdir(entry["name"])


def _is_input(path: str, entry: dict, root: str) -> bool:
    # keys ending in "/" are folder markers that object stores keep for empty folders, not files
    return not path.endswith("/") and entry.get("type") != "directory" and not _hidden(_relative(path, root))


def _word(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


# --- the CoSOD layout and group folders ---------------------------------------------------------------------

@dataclass(frozen=True)
class LayoutRoots:
    """A resolved layout: where the group folders are and where their ground truth is (filesystem paths)."""

    url: str
    storage_options: dict
    image_root: str
    gt_root: str | None
    extensions: tuple[str, ...] = ()  # InputSpec.extensions

    def fs(self):
        return _listing_fs(self.url, self.storage_options)[0]


def resolve_layout(spec: InputSpec) -> tuple[LayoutRoots, list[str]]:
    """(roots, group names) from at most two listings of one level (the root, then image/). Raises on a missing,
    empty or ambiguous root. Group "" stands for the files directly in the image root."""
    if spec.layout not in LAYOUTS:
        raise ValueError(f"layout {spec.layout!r}: use one of {', '.join(LAYOUTS)}")
    shown = redact_url(spec.input)
    fs, base = _listing_fs(spec.input, spec.storage_options)
    base = base.rstrip("/")
    if not fs.exists(base):
        raise FileNotFoundError(f"input {shown} does not exist")
    if not fs.isdir(base):
        raise ValueError(f"input {shown} is a file; --input takes a folder (for a list of images use --manifest)")
    entries = fs.ls(base, detail=True)
    folders = sorted(_relative(e["name"], base).rstrip("/") for e in entries if _is_dir(fs, e))
    folders = [f for f in folders if f]
    has_image = IMAGE_DIR in folders and spec.layout != "groups"
    if spec.layout == "cosod" and not has_image:
        raise ValueError(f"input {shown} has no {IMAGE_DIR}/ folder, which --layout cosod needs "
                         f"(found: {_few(folders) or 'no folders'})")
    if spec.layout == "auto":
        _check_ambiguous(shown, folders, has_image)
    if has_image:
        image_root = posixpath.join(base, IMAGE_DIR)
        gt_root = posixpath.join(base, GT_DIR) if GT_DIR in folders else None
        entries = fs.ls(image_root, detail=True)
    else:
        image_root, gt_root = base, None
    roots = LayoutRoots(spec.input, dict(spec.storage_options), image_root, gt_root,
                        normal_extensions(spec.extensions) if spec.extensions else ())
    names = sorted({_relative(e["name"], image_root).rstrip("/") for e in entries if _is_dir(fs, e)} - {""})
    if any(_is_input(e["name"], e, image_root) and _wanted(e["name"], roots.extensions) and not _is_dir(fs, e)
           for e in entries):
        names.insert(0, "")
    if not names:
        what = f"no file with the extensions {', '.join(roots.extensions)} and no folders" if roots.extensions \
            else "no files or folders"
        raise ValueError(f"input {shown} holds no images: {redact_url(fs.unstrip_protocol(image_root))} has {what}")
    return roots, names


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(f"{x}/" for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _check_ambiguous(shown: str, folders: list[str], has_image: bool) -> None:
    if not has_image:
        odd = [f for f in folders if _word(f) in _NOT_GROUPS]
        if odd:
            raise ValueError(
                f"input {shown} has no {IMAGE_DIR}/ folder but has {_few(odd)}: read as group folders they would "
                f"become groups named {', '.join(repr(f) for f in odd[:5])}. If they hold images and masks, rename "
                f"them {IMAGE_DIR}/ and {GT_DIR}/ (the CoSOD layout); if they really are groups, pass --layout groups.")
    elif GT_DIR not in folders:
        odd = [f for f in folders if f != IMAGE_DIR and _word(f) in _GT_LIKE]
        if odd:
            raise ValueError(
                f"input {shown} has {IMAGE_DIR}/ and {_few(odd)} but no {GT_DIR}/: ground truth is read from "
                f"{GT_DIR}/<group>/<stem>.png only. Rename the folder {GT_DIR}/, or pass --layout cosod to run "
                "without ground truth.")


def list_group(fs, roots: LayoutRoots, group: str) -> GroupSpec:
    """One group's images (with their sizes) and ground truth: a recursive listing of its image folder and of
    its ground-truth folder. Group "" is the files directly in the image root (one level, not a walk)."""
    if group:
        images = fs.find(posixpath.join(roots.image_root, group), detail=True)
        gts = fs.find(posixpath.join(roots.gt_root, group), detail=True) if roots.gt_root else {}
    else:
        images = {e["name"]: e for e in fs.ls(roots.image_root, detail=True) if not _is_dir(fs, e)}
        gts = {e["name"]: e for e in fs.ls(roots.gt_root, detail=True) if not _is_dir(fs, e)} if roots.gt_root else {}
    return _group_spec(fs, roots, group, images, gts)


def _group_spec(fs, roots: LayoutRoots, group: str, images: dict, gts: dict) -> GroupSpec:
    """A group from the listing entries (path -> fsspec info) of its image and ground-truth folders."""
    gt_by_stem: dict[str, str] = {}
    for path in sorted(gts, key=_gt_preference):
        if _is_input(path, gts[path], roots.gt_root):
            gt_by_stem.setdefault(_stem(_relative(path, roots.gt_root)), path)
    spec = GroupSpec(group)
    for path in sorted(images):
        entry = images[path]
        if not _is_input(path, entry, roots.image_root) or not _wanted(path, roots.extensions):
            continue
        rel = _relative(path, roots.image_root)
        name = rel[len(group) + 1:] if group else rel
        gt = gt_by_stem.get(_stem(rel))  # <group>/<stem>
        size = entry.get("size")
        spec.images.append(ImageSpec(fs.unstrip_protocol(path), fs.unstrip_protocol(gt) if gt else None, name,
                                     size=int(size) if size is not None else -1))
    return spec


def _key_order(group: str) -> str:
    # Object stores list keys in UTF-8 byte (= code point) order, and a group's keys all start "<group>/":
    # "a-b/" sorts before "a/", so groups are ordered as their prefixes are.
    return group + "/"


def _s3_range_listing(fs, root: str) -> bool:
    """s3fs without object versions, on a general-purpose bucket: group folders are listed by ranges of keys
    (``_walk_range``). S3 Express directory buckets (``*--x-s3``) list keys out of order and take no StartAfter."""
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return False
    return isinstance(fs, S3FileSystem) and not fs.version_aware and not fs.split_path(root)[0].endswith("--x-s3")


class _Unordered(Exception):
    """A listing whose keys did not come in order: its ranges cannot be walked (each group is listed instead)."""


def _walk_range(fs, root: str, run: list[str]) -> dict[str, dict[str, dict]]:
    """group -> {path: entry} for every object under root/<g>/ for the groups g of ``run`` (consecutive in key
    order): one ListObjectsV2 walk from root/<first>/ that stops past root/<last>/. Keys between them that
    belong to no group of the run (files directly in root) are skipped."""
    bucket, key_root, _ = fs.split_path(root)
    prefix = f"{key_root.rstrip('/')}/" if key_root else ""
    last = prefix + _key_order(run[-1])
    wanted = set(run)
    found: dict[str, dict[str, dict]] = {g: {} for g in run}
    # The last page of a walk runs on into the next run's keys, and parsing a key costs more than the request:
    # the first page is sized for small groups and each next one doubles, up to S3's 1,000.
    max_keys = min(LIST_PAGE_KEYS, FIRST_PAGE_KEYS_PER_GROUP * len(run))
    # requester pays and the like: s3fs adds its request options itself only in its recent versions
    base = {**getattr(fs, "req_kw", {}), "Bucket": bucket, "Prefix": prefix}
    request = {**base, "StartAfter": prefix + _key_order(run[0])}
    previous = ""
    while True:
        page = fs.call_s3("list_objects_v2", MaxKeys=max_keys, **request)
        max_keys = min(LIST_PAGE_KEYS, 2 * max_keys)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if key <= previous:  # the walk stops at the first key past the run: only sound in key order
                raise _Unordered(key)
            previous = key
            if key > last and not key.startswith(last):
                return found
            group, slash, _ = key[len(prefix):].partition("/")
            if slash and group in wanted:
                found[group][f"{bucket}/{key}"] = {"name": f"{bucket}/{key}", "size": obj.get("Size"),
                                                   "type": "file"}
        if not page.get("IsTruncated"):
            return found
        request = {**base, "ContinuationToken": page["NextContinuationToken"]}


def key_runs(names: list[str], ranks: list[int] | None, size: int) -> list[list[str]]:
    """Groups cut into runs of at most ``size`` groups that are consecutive in key order. ``ranks`` are the
    groups' places in the whole input's key order (None: ``names`` are all of it); a gap between ranks ends a
    run, so that no walk lists another task's groups."""
    if ranks is None:
        ranks, names = list(range(len(names))), sorted(names, key=_key_order)
    runs: list[list[str]] = []
    previous = None
    for rank, name in sorted(zip(ranks, names)):
        if not runs or len(runs[-1]) >= size or rank != previous + 1:
            runs.append([])
        runs[-1].append(name)
        previous = rank
    return runs


def _list_groups(fs, roots: LayoutRoots, names: list[str], ranks: list[int] | None = None) -> list[GroupSpec]:
    # A bounded pool: each listing waits on the object store, so a few dozen at once hide its latency.
    if _s3_range_listing(fs, roots.image_root) and len(names) > 1:
        try:
            return _list_runs(fs, roots, names, ranks)
        except _Unordered:
            pass
    if len(names) <= 1:
        return [list_group(fs, roots, g) for g in names]
    with ThreadPoolExecutor(min(LIST_THREADS, len(names))) as pool:
        return list(pool.map(lambda g: list_group(fs, roots, g), names))


def _list_runs(fs, roots: LayoutRoots, names: list[str], ranks: list[int] | None) -> list[GroupSpec]:
    """S3: runs of GROUPS_PER_RUN neighbouring groups, each one walk over its range of image keys and one over
    its ground truth's, all in the pool at once."""
    keep = [i for i, g in enumerate(names) if g]
    runs = key_runs([names[i] for i in keep], [ranks[i] for i in keep] if ranks is not None else None, GROUPS_PER_RUN)
    walks = [(run, is_gt) for run in runs for is_gt in ((False, True) if roots.gt_root else (False,))]
    with ThreadPoolExecutor(min(LIST_THREADS, len(walks))) as pool:
        found = list(pool.map(lambda w: _walk_range(fs, roots.gt_root if w[1] else roots.image_root, w[0]), walks))
    images, gts = {}, {}
    for (_, is_gt), listed in zip(walks, found):
        (gts if is_gt else images).update(listed)
    specs = [_group_spec(fs, roots, g, images[g], gts.get(g, {})) for run in runs for g in run]
    return specs + ([list_group(fs, roots, "")] if "" in names else [])


def list_layout(storage: Storage, layout: str = "auto", extensions: tuple[str, ...] = ()) -> list[GroupSpec]:
    """Lists a CoSOD-layout root (image/ + groundtruth/) or a root of group folders on this process (training,
    small inputs). A group folder with no file is kept as an empty group (it yields no rows, and the run
    records it)."""
    roots, names = resolve_layout(InputSpec(input=storage.root, layout=layout, storage_options=storage.options,
                                            extensions=tuple(extensions)))
    return finish(_list_groups(roots.fs(), roots, names))


def _list_groups_batch(batch: pa.Table, roots: LayoutRoots) -> pa.Table:
    specs = _list_groups(roots.fs(), roots, batch.column("group").to_pylist(), batch.column("rank").to_pylist())
    return rows_table([group_row(finish_group(s)) for s in specs])


# --- manifests ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestFile:
    """A checked manifest: its format, compression and the folder its relative URIs are relative to."""

    url: str
    storage_options: dict
    path: str
    format: str  # parquet | csv
    compression: str | None  # gzip | None (CSV only)
    columns: tuple[str, ...]
    base_url: str
    size: int  # bytes, to size the shuffle that groups its rows

    def fs(self):
        return _listing_fs(self.url, self.storage_options)[0]

    @property
    def present(self) -> list[str]:
        """The manifest columns this file has, in MANIFEST_COLUMNS' order."""
        return [c for c in MANIFEST_COLUMNS if c in self.columns]


def check_manifest(url: str, options: dict) -> ManifestFile:
    """Reads a manifest's first bytes and header (never the whole file): the format from its content (Parquet's
    magic number, gzip's), its columns. Raises a clear error for a missing, empty or unreadable manifest."""
    shown = redact_url(url)
    fs, path = _listing_fs(url, options)
    if not fs.exists(path) or fs.isdir(path):
        raise FileNotFoundError(f"manifest {shown} does not exist (or is a folder; give one Parquet or CSV file)")
    with fs.open(path, "rb") as f:
        magic = f.read(4)
    lower = path.lower()
    if magic == b"PAR1":
        fmt, compression = "parquet", None
    elif lower.endswith((".parquet", ".pq", ".parq")):
        raise ValueError(f"manifest {shown} is named as Parquet but is not a Parquet file")
    elif magic[:2] == b"\x1f\x8b":
        fmt, compression = "csv", "gzip"
    elif lower.endswith(".gz"):
        raise ValueError(f"manifest {shown} is named .gz but is not gzip-compressed")
    else:
        fmt, compression = "csv", None
    try:
        if fmt == "parquet":
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
                columns, rows = tuple(meta.schema.names), meta.num_rows
        else:
            with fs.open(path, "rb", compression=compression) as f:
                reader = pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in MANIFEST_COLUMNS}))
                columns = tuple(reader.schema.names)
                rows = next((b.num_rows for b in reader if b.num_rows), 0)
    except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
        raise ValueError(f"manifest {shown} cannot be read as {fmt.upper()}"
                         f"{' (gzip)' if compression else ''}: {redact_text(str(exc))}") from None
    missing = [c for c in MANIFEST_COLUMNS[:2] if c not in columns]
    if missing:
        raise ValueError(f"manifest {shown}: missing column(s) {missing}; needs group, image_uri [, gt_uri] "
                         f"(found {list(columns)})")
    if not rows:
        raise ValueError(f"manifest {shown} has no rows")
    return ManifestFile(url, dict(options), path, fmt, compression, columns,
                        fs.unstrip_protocol(posixpath.dirname(path)), int(fs.size(path) or 0))


def _csv_convert_options(manifest: ManifestFile) -> pacsv.ConvertOptions:
    # Every column as text: a group "01" stays "01", "NA" stays "NA", an empty cell is "" (no ground truth).
    present = manifest.present
    return pacsv.ConvertOptions(column_types={c: pa.string() for c in present}, include_columns=present,
                                strings_can_be_null=False)


def _read_manifest(manifest: ManifestFile) -> pa.Table:
    """The whole manifest on this process (list_manifest: small inputs)."""
    fs = manifest.fs()
    if manifest.format == "parquet":
        with fs.open(manifest.path, "rb") as f:
            return pq.read_table(f, columns=manifest.present)
    with fs.open(manifest.path, "rb", compression=manifest.compression) as f:
        return pacsv.read_csv(f, convert_options=_csv_convert_options(manifest))


def _resolve(uri: str, base_url: str) -> str:
    # Relative entries are relative to the manifest's folder.
    return uri if not uri or "://" in uri or uri.startswith("/") else posixpath.join(base_url, uri)


def normalize_manifest(table: pa.Table, base_url: str) -> pa.Table:
    """Manifest rows -> group (str, "" for none), image_uri, gt_uri ("" for none), with relative URIs resolved."""

    def text(name: str) -> list[str]:
        if name not in table.column_names:
            return [""] * table.num_rows
        return pc.fill_null(pc.cast(table.column(name), pa.string()), "").to_pylist()

    return pa.table({"group": text("group"),
                     "image_uri": [_resolve(u, base_url) for u in text("image_uri")],
                     "gt_uri": [_resolve(u, base_url) for u in text("gt_uri")]})


def manifest_group(group: str, image_uris: list[str], gt_uris: list[str]) -> GroupSpec:
    """One group of a manifest (its rows in any order) -> a finished GroupSpec."""
    spec = GroupSpec(group, [ImageSpec(u, g or None, posixpath.basename(u.split("?")[0]))
                             for u, g in zip(image_uris, gt_uris)])
    return finish_group(spec)


def _manifest_group_batch(batch: pa.Table) -> pa.Table:
    cols = batch.to_pydict()
    spec = manifest_group(cols["group"][0], cols["image_uri"], cols["gt_uri"])
    return rows_table([group_row(spec)])


def list_manifest(url: str, options: dict) -> list[GroupSpec]:
    """Reads a manifest (Parquet, CSV or CSV.gz, told apart by content) with columns group, image_uri [, gt_uri]
    on this process (small inputs); ``group_dataset`` reads large ones with Ray Data."""
    manifest = check_manifest(url, options)
    rows = normalize_manifest(_read_manifest(manifest), manifest.base_url).to_pydict()
    by_group: dict[str, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for group, image_uri, gt_uri in zip(rows["group"], rows["image_uri"], rows["gt_uri"]):
        by_group[group][0].append(image_uri)
        by_group[group][1].append(gt_uri)
    return finish([manifest_group(g, images, gts) for g, (images, gts) in by_group.items()])


# --- the driver's API ---------------------------------------------------------------------------------------

def check_input(spec: InputSpec) -> None:
    """Fast checks on the driver before any work is started or written: the input exists; the root is not
    ambiguous; a manifest is readable and has its columns. Raises ValueError/FileNotFoundError with a clear
    message (URLs redacted)."""
    _check(spec)


def _check(spec: InputSpec) -> ManifestFile | tuple[LayoutRoots, list[str]]:
    if bool(spec.input) == bool(spec.manifest):
        raise ValueError("give either --input (a URL or path) or --manifest, not both" if spec.input
                         else "give --input (a URL or path) or --manifest")
    if spec.manifest:
        return check_manifest(spec.manifest, spec.storage_options)
    return resolve_layout(spec)


def group_dataset(spec: InputSpec):
    """One row per group (``ROW_SCHEMA``): group (str), group_key (str, safe name), names, image_uris,
    gt_uris ("" when none), mask_keys (lists of str), image_bytes (list of int, size from the listing, -1
    unknown), n_images (int). Images sorted by URI, mask keys from ``assign_mask_keys``; empty group folders
    are rows with no images. Row order is not kept.

    A layout is listed by Ray tasks (the driver lists only the group folder names); a manifest is read with
    ``ray.data.read_parquet``/``read_csv`` and grouped with ``groupby("group").map_groups``. The dataset is
    lazy: ``materialize()`` it before using it more than once (``summarize`` then the job), or the listing
    runs again. A block holds up to GROUPS_PER_TASK groups (a manifest's: a shuffle partition's): per-group
    work meant to run in parallel wants ``repartition(target_num_rows_per_block=1)`` first."""
    import ray

    checked = _check(spec)
    if isinstance(checked, ManifestFile):
        return _manifest_dataset(checked)
    roots, names = checked
    blocks = max(1, -(-len(names) // GROUPS_PER_TASK))
    # rank: the group's place in key order, so that a task lists runs of neighbours (``key_runs``)
    ranked = sorted(names, key=_key_order)
    ds = _sort_shuffled(ray.data.from_items([{"group": g, "rank": i} for i, g in enumerate(ranked)],
                                            override_num_blocks=blocks))
    return ds.map_batches(_list_groups_batch, fn_kwargs={"roots": roots}, batch_format="pyarrow",
                          batch_size=GROUPS_PER_TASK, num_cpus=LIST_CPUS)


def _manifest_dataset(manifest: ManifestFile):
    import ray
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    filesystem = PyFileSystem(FSSpecHandler(manifest.fs()))
    if manifest.format == "parquet":
        ds = ray.data.read_parquet(manifest.path, filesystem=filesystem, file_extensions=None) \
            .select_columns(manifest.present)
    else:
        ds = ray.data.read_csv(manifest.path, filesystem=filesystem, file_extensions=None,
                               convert_options=_csv_convert_options(manifest),
                               arrow_open_stream_args={"compression": manifest.compression})
    ds = _sort_shuffled(ds).map_batches(normalize_manifest, fn_kwargs={"base_url": manifest.base_url}, batch_format="pyarrow",
                        num_cpus=LIST_CPUS)
    # a partition per ~64 MB of manifest (~500,000 rows): each shuffle partition costs a task or more
    partitions = min(MAX_SHUFFLE_PARTITIONS, 1 + manifest.size // (64 << 20))
    return ds.groupby("group", num_partitions=partitions).map_groups(_manifest_group_batch, batch_format="pyarrow", num_cpus=LIST_CPUS)


def _sort_shuffled(ds):
    """Ray Data's sort-based shuffle for the groupby and the summary's aggregations of this dataset and those
    made from it (a source dataset owns a copy of the DataContext): they move only URIs and counts, and the
    default hash shuffle starts aggregator actors that cost 10-30 s per use on a small cluster."""
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    return ds


def group_row(spec: GroupSpec) -> dict:
    """A finished GroupSpec as a ``group_dataset`` row."""
    return {
        "group": spec.group,
        "group_key": spec.key,
        "names": [im.name for im in spec.images],
        "image_uris": [im.image_uri for im in spec.images],
        "gt_uris": [im.gt_uri or "" for im in spec.images],
        "mask_keys": [im.mask_key for im in spec.images],
        "image_bytes": [im.size for im in spec.images],
        "n_images": len(spec.images),
    }


def rows_table(rows: list[dict]) -> pa.Table:
    # An explicit schema: a block of empty groups must still have list<string> columns.
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


# --- the summary (plan-only runs, the job's log) ------------------------------------------------------------

def _sizes_batch(batch: pa.Table) -> pa.Table:
    n = batch.num_rows

    def per_group(column: str, keep) -> np.ndarray:
        values = batch.column(column)
        flat = pc.list_flatten(values).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=keep(flat), minlength=n).astype(np.int64)

    return pa.table({
        "group": batch.column("group"),
        "n_images": batch.column("n_images"),
        "n_gt": per_group("gt_uris", lambda v: v != ""),
        "known_bytes": per_group("image_bytes", lambda v: np.where(v >= 0, v, 0)),
        "unknown_sizes": per_group("image_bytes", lambda v: v < 0),
    })


def _aggregators(first: int) -> list:
    from ray.data.aggregate import AggregateFnV2
    from ray.data.block import BlockAccessor

    class Largest(AggregateFnV2):
        """{"images", "group"} of the largest group; ties go to the first name. Dicts, not tuples: Arrow stores
        them as structs (a tuple of int and str makes Ray Data warn and fall back to pickling)."""

        def __init__(self):
            super().__init__("largest_group", zero_factory=lambda: {"images": -1, "group": ""}, on=None,
                             ignore_nulls=False)

        def aggregate_block(self, block):
            t = BlockAccessor.for_block(block).to_arrow()
            if t.num_rows == 0:
                return {"images": -1, "group": ""}
            size = pc.max(t.column("n_images")).as_py()
            names = t.filter(pc.equal(t.column("n_images"), size)).column("group")
            return {"images": size, "group": pc.min(names).as_py()}

        def combine(self, a, b):
            return min(a, b, key=lambda x: (-x["images"], x["group"]))

    class EmptyGroups(AggregateFnV2):
        """{"count", "first"}: how many groups have no image, and the first few of their names (sorted)."""

        def __init__(self):
            super().__init__("empty_groups", zero_factory=lambda: {"count": 0, "first": []}, on=None,
                             ignore_nulls=False)

        def aggregate_block(self, block):
            t = BlockAccessor.for_block(block).to_arrow()
            names = t.filter(pc.equal(t.column("n_images"), 0)).column("group").to_pylist()
            return {"count": len(names), "first": sorted(names)[:first]}

        def combine(self, a, b):
            return {"count": a["count"] + b["count"], "first": sorted(list(a["first"]) + list(b["first"]))[:first]}

    return [Largest(), EmptyGroups()]


def summarize(ds, first: int = 5) -> dict:
    """groups, images, images_with_gt, bytes (known sizes), empty_groups (count + first names), largest group
    (name, size), group-size percentiles; computed with Ray Data aggregations, not by pulling rows to the
    driver. Runs ``ds``: materialize it first if it is used again."""
    from ray.data.aggregate import Count, Max, Min, Quantile, Sum

    sizes = ds.map_batches(_sizes_batch, batch_format="pyarrow", num_cpus=LIST_CPUS)
    aggs = [Count(alias_name="groups"), Sum("n_images", alias_name="images"),
            Sum("n_gt", alias_name="images_with_gt"), Sum("known_bytes", alias_name="bytes"),
            Sum("unknown_sizes", alias_name="images_of_unknown_size"),
            Min("n_images", alias_name="min"), Max("n_images", alias_name="max"),
            *[Quantile("n_images", q=q, alias_name=f"p{round(q * 100)}") for q in PERCENTILES],
            *_aggregators(first)]
    out = sizes.aggregate(*aggs)
    groups = int(out.get("groups") or 0)

    def number(key):
        value = out.get(key)
        return 0 if value is None or value != value else int(value)

    largest = out.get("largest_group") or {"images": -1, "group": ""}
    empty = out.get("empty_groups") or {"count": 0, "first": []}
    percentiles = {"min": number("min")} if groups else {}
    if groups:
        percentiles.update({f"p{round(q * 100)}": float(out[f"p{round(q * 100)}"]) for q in PERCENTILES})
        percentiles["max"] = number("max")
    return {
        "groups": groups,
        "images": number("images"),
        "images_with_gt": number("images_with_gt"),
        "bytes": number("bytes"),
        "images_of_unknown_size": number("images_of_unknown_size"),
        "empty_groups": {"count": int(empty["count"]), "first": list(empty["first"])},
        "largest_group": {"group": largest["group"], "images": int(largest["images"])} if groups else None,
        "group_size_percentiles": percentiles,
    }


# --- shared by every path -----------------------------------------------------------------------------------

def finish(groups: list[GroupSpec]) -> list[GroupSpec]:
    """Sorts groups and images and gives every image a unique, safe mask key."""
    groups.sort(key=lambda g: g.group)
    keys: dict[str, str] = {}
    for spec in groups:
        if spec.key in keys and keys[spec.key] != spec.group:  # impossible by construction; guard anyway
            raise ValueError(f"groups {spec.group!r} and {keys[spec.key]!r} map to the same output folder")
        keys[spec.key] = spec.group
        finish_group(spec)
    return groups


def finish_group(spec: GroupSpec) -> GroupSpec:
    """Sorts a group's images by URI and gives each a unique, safe mask key."""
    spec.images.sort(key=lambda im: im.image_uri)
    assign_mask_keys(spec)
    return spec


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
