"""Offline evaluation: per-image metrics from inference runs or from any method's maps, aggregated per dataset and
per group in a stream (exact sums, so any split or order of the images gives the numbers of one pass).

Two kinds of input, each under a label:
  * a run of jobs/infer.py: its predictions Parquet already holds every image's metrics; it is scanned in record
    batches (pyarrow dataset scanner), reading only the columns needed;
  * maps in the CoSOD layout, ``<maps>/<group>/<stem>.png``, against ground truth ``<gt>/<group>/<stem>.png``:
    metrics are computed here (pysodmetrics), one group per task, locally or on Ray Data.

Memory does not grow with the number of images. What is held, per source:
  * the dataset's exact sums: ``MetricSums``, (partials ~3, 1029) float64;
  * open groups' exact sums, 1029 x ~3 float64 (~25 KiB) each. A group is open from its first row until all its
    rows have been seen (the count per group comes from a first pass over the ``group`` column of a run, or
    from the listing of a maps group) and is then reduced to its summary and merged into the dataset's sums.
    Open at once: the groups of one flush (``FLUSH_ROWS`` rows) plus those whose rows are split over files not
    yet read. Files are read in the order of the first group they hold, which is about the order jobs/infer.py
    wrote them, so a group split over shards is usually complete one or two files later. A Parquet whose groups
    are scattered over all files would keep them all open: past ``MAX_OPEN_GROUPS`` the run is read again in
    passes, each taking the groups of one hash class, so the bound holds (~300 MB) whatever the layout;
  * the finished groups' summaries and counts (~125 bytes each: 50 MB for 400k groups), which metrics.parquet
    holds in full (a row for every group, images 0 where none was scored) while the report shows the top and
    bottom ones;
  * the first pass's rows per group (~100 bytes a group) and first group per file; open groups' counts of
    errors, missing maps and rows without metrics;
  * rows in flight: the scanner's read-ahead (two files' current row groups, so shards written with row groups
    of a few thousand rows keep this small) and up to ``FLUSH_ROWS`` rows waiting to be added (8 KiB each);
  * the gallery's candidates: the k best and k worst images by S-measure (``Extremes``), not the rows.
Measured (benchmarks/bench_evaluate.py, 10,000-row shards, 4,096-row row groups): peak RSS ~0.7 GB above the
imports at 0.1M, 0.3M and 1M rows alike, ~1.1 GB with every group scattered over all files (read in passes).
"""
from __future__ import annotations

import io
import posixpath
import sys
import zlib
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from PIL import Image

from scosparc_core.metrics import CURVE_POINTS, CURVES, SCALARS, WIDTH, MetricSums, image_metrics

from .decode import error_kind, read_gt, read_many
from .listing import _gt_preference
from .output_state import OutputState
from .predictions import COMMITS
from .storage import Storage, redact_url

# Published SCoSPARC figures (trained on COCO-9213 + DUTS-Class): max-F, S-measure, max-E, MAE.
PAPER = {
    "coca": {"max_fm": 0.614, "sm": 0.711, "max_em": 0.782, "mae": 0.092},
    "cosal2015": {"max_fm": 0.869, "sm": 0.851, "max_em": 0.905, "mae": 0.062},
    "cosod3k": {"max_fm": 0.827, "sm": 0.823, "max_em": 0.889, "mae": 0.064},
}
SUMMARY = ("max_fm", "mean_fm", "adp_fm", "sm", "max_em", "mean_em", "adp_em", "mae", "wfm")
BATCH_ROWS = 1024  # rows per scanned record batch (~8 MiB of curves)
FLUSH_ROWS = 2048  # rows gathered before they are added to the exact sums (fewer, larger numpy passes)
GALLERY = 6  # best and worst images kept per source
MAX_OPEN_GROUPS = 4_000  # sums held at once (~33 KiB a group; > FLUSH_ROWS) before a run is read in passes
# Columns read for the gallery's few images only, after the scan; tolerated when absent (older runs).
GALLERY_COLUMNS = ("group", "name", "image_uri", "gt_uri", "mask_uri", "mask_png", "sm", "mae")
# Files of a maps or ground-truth group that are images; others (Thumbs.db, README.txt) are not the group's.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm", ".pbm")
COUNTS = ("errors", "missing_predictions", "images_without_metrics")  # per group and dataset, integers


@dataclass(frozen=True)
class Source:
    """One labelled input: a run (``run`` URL) or maps (``maps`` root + ``gt`` root, photos under ``images``)."""

    label: str
    run: str | None = None
    maps: str | None = None
    gt: str | None = None
    images: str | None = None  # maps only: <images>/<group>/<stem>.*; default: the CoSOD layout, <gt>/../image
    dataset: str | None = None
    options: dict = field(default_factory=dict)

    def image_root(self) -> str | None:
        if self.images or not self.gt:
            return self.images
        return posixpath.join(posixpath.dirname(self.gt.rstrip("/")), "image")


def dataset_name(source: Source) -> str:
    if source.dataset:
        return source.dataset
    if source.run:
        try:
            manifest = Storage(source.run, source.options).read_json("_run.json")
            url = manifest["settings"].get("input") or manifest["settings"].get("manifest") or ""
            return posixpath.basename(url.rstrip("/")) or "dataset"
        except (FileNotFoundError, KeyError):
            return "dataset"
    parent = posixpath.dirname(source.gt.rstrip("/"))
    leaf = posixpath.basename(source.gt.rstrip("/"))
    return posixpath.basename(parent) if leaf.lower() in ("groundtruth", "gt") else leaf


class Extremes:
    """The k lowest and k highest S-measure images seen, ordered by (S, reference), in O(k) memory.

    References are sortable tuples, unique per image, so ties resolve the same way in any order of arrival.
    """

    def __init__(self, k: int = GALLERY):
        self.k = k
        self.scored = 0
        self.low: list[tuple] = []  # (sm, ref, mae)
        self.high: list[tuple] = []

    def feed(self, sm: np.ndarray, mae: np.ndarray, ref: Callable[[int], tuple]) -> None:
        valid = np.flatnonzero(np.isfinite(sm))
        self.scored += len(valid)
        if not len(valid) or self.k <= 0:
            return
        values = sm[valid]
        low, high = valid, valid
        if len(values) > self.k:  # only this batch's k lowest and highest (ties included) can enter
            low = valid[values <= np.partition(values, self.k - 1)[self.k - 1]]
            high = valid[values >= np.partition(values, len(values) - self.k)[len(values) - self.k]]
        self.low = sorted(self.low + [(float(sm[i]), ref(i), float(mae[i])) for i in low],
                          key=lambda c: (c[0], c[1]))[: self.k]
        self.high = sorted(self.high + [(float(sm[i]), ref(i), float(mae[i])) for i in high],
                           key=lambda c: (-c[0], c[1]))[: self.k]

    def picks(self) -> dict[str, list[tuple]]:
        """{"worst": [...], "best": [...]}; small sets give fewer so that the two do not overlap."""
        count = min(self.k, max(1, self.scored // 2))
        return {"worst": self.low[:count], "best": self.high[:count]}


class TooManyOpenGroups(Exception):
    """More groups are open at once than ``max_open`` allows."""


class StreamingEvaluation:
    """Per-image metric rows in, dataset and per-group figures out, in bounded memory (see the module's doc).

    ``feed`` takes a batch of rows; ``expected`` (group -> number of rows) says when a group is complete.
    Groups whose count is unknown stay open until ``finish``. Rows are added in flushes of ``FLUSH_ROWS``;
    complete groups are closed after each.
    """

    def __init__(self, expected: Mapping[str, int] | None = None, gallery: int = GALLERY,
                 max_open: int | None = None):
        self.expected: dict[str, int] = dict(expected or {})
        self.max_open = max_open
        self.passes = 1
        self.dataset = MetricSums()
        self.groups = MetricSums(slots=8)
        self.slot: dict[str, int] = {}  # open group -> its slot in self.groups
        self.free = list(range(8))[::-1]
        self.seen: dict[str, int] = {}  # open group -> rows seen
        self.counts: dict[str, list[int]] = {}  # open group -> its COUNTS so far
        self.ready: list[str] = []  # groups whose rows are all in, closed at the next flush
        self.closed: set[str] = set()
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []  # (group names, packed metric rows)
        self.pending_rows = 0
        self.table = {"group": [], "images": array("q"), **{k: array("d") for k in SUMMARY},
                      **{k: array("q") for k in COUNTS}}
        self.rows = 0
        self.without_metrics = 0
        self.missing = 0
        self.errors = 0
        self.most_open = 0  # groups still open after a flush: those whose rows are not all in yet
        self.extremes = Extremes(gallery)
        self.gallery_rows: dict[str, list[dict]] = {"worst": [], "best": []}  # filled by evaluate_run/_maps

    def feed(self, group: np.ndarray, has_metrics: np.ndarray, rows: np.ndarray, ref: Callable[[int], tuple],
             status: np.ndarray | None = None) -> None:
        """group (n,) str and has_metrics (n,) bool for every row of a batch; rows: (m, WIDTH) the metrics of the m
        rows that have them, in order, packed as ``MetricSums.pack`` does; ref(j) -> a unique sortable reference
        of the j-th of those rows (for the gallery); status (n,) str, counted: "error", and "missing" for a
        prediction that does not exist (not scored, not among the images without metrics)."""
        n = len(group)
        self.rows += n
        error = status == "error" if status is not None else np.zeros(n, bool)
        missing = status == "missing" if status is not None else np.zeros(n, bool)
        without = ~np.asarray(has_metrics, bool) & ~missing
        self.errors += int(np.count_nonzero(error))
        self.missing += int(np.count_nonzero(missing))
        self.without_metrics += int(np.count_nonzero(without))
        names, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
        tallies = np.stack([np.bincount(inverse, flag, len(names)) for flag in (error, missing, without)], axis=1)
        for name, c, tally in zip(names.tolist(), counts.tolist(), tallies.astype(np.int64).tolist()):
            if name in self.closed:
                raise RuntimeError(f"rows of group {name!r} arrived after it was complete: the predictions "
                                   f"changed while they were read, or a group is split over inconsistent files")
            self.seen[name] = self.seen.get(name, 0) + c
            self.counts[name] = [a + b for a, b in zip(self.counts.get(name, (0, 0, 0)), tally)]
            if self.seen[name] >= self.expected.get(name, -1) >= 0:
                self.ready.append(name)
        if len(rows):
            self.pending.append((group[has_metrics], rows))
            self.pending_rows += len(rows)
            self.extremes.feed(rows[:, SCALARS.index("sm")], rows[:, SCALARS.index("mae")], ref)
        if self.pending_rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        """Adds the pending rows to their groups' sums, then closes the groups that are complete."""
        if self.pending:
            groups = np.concatenate([g for g, _ in self.pending])
            rows = self.pending[0][1] if len(self.pending) == 1 else np.concatenate([r for _, r in self.pending])
            self.pending, self.pending_rows = [], 0
            names, inverse = np.unique(groups, return_inverse=True)
            slots = np.array([self._open(name) for name in names.tolist()])
            self.groups.add_packed(rows, slots[inverse])
        self._close(self.ready)
        self.ready = []
        self.most_open = max(self.most_open, len(self.slot))
        if self.max_open is not None and len(self.slot) > self.max_open:
            raise TooManyOpenGroups(f"{len(self.slot)} groups open at once")

    def _open(self, name: str) -> int:
        if name not in self.slot:
            if not self.free:
                size = self.groups.sums.slots
                self.groups.resize(2 * size)
                self.free = list(range(2 * size - 1, size - 1, -1))
            self.slot[name] = self.free.pop()
        return self.slot[name]

    def _close(self, names: list[str]) -> None:
        """Reduces groups to their summary rows and merges their sums into the dataset's. A group without a scored
        image (all errors, missing maps or no ground truth) gets a row too: images 0, figures NaN, its counts."""
        names = [g for g in dict.fromkeys(names) if g in self.seen]
        scored = sorted((g for g in names if g in self.slot), key=self.slot.get)
        unscored = [g for g in names if g not in self.slot]
        if scored:
            slots = np.array([self.slot.pop(g) for g in scored])
            result = self.groups.results(slots)
            self.table["images"].extend(result["images"].tolist())
            for k in SUMMARY:
                self.table[k].extend(result[k].tolist())
            self.dataset.merge(self.groups, slots, into=0)
            self.groups.reset(slots)
            self.free.extend(slots.tolist())
        self.table["images"].extend([0] * len(unscored))
        for k in SUMMARY:
            self.table[k].extend([np.nan] * len(unscored))
        self.table["group"].extend(scored + unscored)
        for g in scored + unscored:
            for k, c in zip(COUNTS, self.counts.pop(g)):
                self.table[k].append(c)
            self.seen.pop(g)
            self.closed.add(g)

    def finish(self) -> tuple[dict, pd.DataFrame]:
        """(dataset figures as ``aggregate`` gives them, per-group table sorted by group)."""
        self.flush()
        self._close(list(self.seen))
        table = pd.DataFrame({k: (list(v) if k == "group" else np.asarray(v)) for k, v in self.table.items()})
        return self.dataset.result(), table.sort_values("group", kind="stable").reset_index(drop=True)


# ---- runs -----------------------------------------------------------------------------------------------------

def _run_files(source: Source) -> tuple[Storage, list[str]]:
    """The run's prediction shards: those its commit records name (a shard a job died writing is not one), or,
    for a folder without records, every Parquet file under ``predictions/``."""
    out = Storage(source.run, source.options)
    if out.exists(COMMITS):
        if not out.exists("_SUCCESS"):
            print(f"[evaluate] {redact_url(out.url())} has no _SUCCESS: the run is unfinished or has transient "
                  "errors; images without rows are left out, and rows a re-run superseded but has not yet "
                  "compacted count twice. Run the job again to finish it.", file=sys.stderr, flush=True)
        return out, sorted(out.path(r["shard"]) for r in OutputState.load(out).records)
    root = out.path("predictions")
    files = sorted(p for p in (out.fs.find(root) if out.fs.exists(root) else [])
                   if p.endswith(".parquet") and not posixpath.basename(p).startswith(("_", ".")))
    return out, files


def _plan(out: Storage, files: list[str]) -> tuple[list[str], dict[str, int]]:
    """First pass, over the ``group`` column alone: rows per group (when each group is complete), and the files
    ordered by the first group they hold. Shards are written in about the order groups are processed but named
    by digest; in that order a group split over shards meets its other rows soon, so few groups stay open."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    dataset = pads.dataset(files, format="parquet", filesystem=out.fs)
    for tagged in dataset.scanner(columns=["group"], batch_size=65536).scan_batches():
        column = tagged.record_batch.column(0).fill_null("")
        found = pc.value_counts(column)
        for name, c in zip(found.field("values").to_pylist(), found.field("counts").to_pylist()):
            counts[name] = counts.get(name, 0) + c
        low = pc.min(column).as_py()
        if low is not None:
            path = tagged.fragment.path
            first[path] = min(first.get(path, low), low)
    return sorted(files, key=lambda p: (first.get(p, ""), p)), counts


def _strings(column: pa.Array) -> np.ndarray:
    return np.asarray(column.fill_null("").to_numpy(zero_copy_only=False), dtype=object)


def _doubles(array: pa.Array) -> np.ndarray:
    """The values of a float64 array without a copy, null slots included (what they hold is unspecified: callers
    mask them out). Other types are converted."""
    data = array.buffers()[1] if pa.types.is_float64(array.type) else None
    if data is None:
        return np.asarray(array.to_numpy(zero_copy_only=False), np.float64)
    return np.frombuffer(data, np.float64, count=len(array), offset=array.offset * 8)


def _metric_rows(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(has_metrics (n,), (m, WIDTH) packed metrics of the rows that carry every metric)."""
    n = batch.num_rows
    if not set(SCALARS) | set(CURVES) <= set(batch.schema.names):  # a run without ground truth
        return np.zeros(n, bool), np.zeros((0, WIDTH))
    has = np.ones(n, bool)
    for key in (*SCALARS, *CURVES):
        column = batch.column(key)
        if column.null_count:
            has &= column.is_valid().to_numpy(zero_copy_only=False)
    rows = np.empty((int(has.sum()), WIDTH))
    for i, key in enumerate(SCALARS):
        rows[:, i] = _doubles(batch.column(key))[has]
    for j, key in enumerate(CURVES):
        column = batch.column(key)
        if pa.types.is_fixed_size_list(column.type):  # the child values as they lie, null slots included
            curves = _doubles(column.values.slice(column.offset * CURVE_POINTS, n * CURVE_POINTS))
            curves = curves.reshape(n, CURVE_POINTS)[has]
        else:  # variable-size lists (other writers): only the chosen rows, flattened
            curves = column.filter(pa.array(has)).flatten().to_numpy(zero_copy_only=False).reshape(-1, CURVE_POINTS)
        start = len(SCALARS) + j * CURVE_POINTS
        rows[:, start : start + CURVE_POINTS] = curves
    keep = np.isfinite(rows[:, SCALARS.index("mae")])  # a NaN MAE: no usable ground truth
    if not keep.all():
        has[np.flatnonzero(has)[~keep]] = False
        rows = rows[keep]
    return has, rows


def evaluate_run(source: Source, gallery: int = GALLERY) -> StreamingEvaluation:
    """Scans a run's predictions Parquet in record batches: only ``group``, ``status`` and the metric columns.

    Should more than ``MAX_OPEN_GROUPS`` groups be open at once (rows of each group scattered over many files,
    which jobs/infer.py does not write), the scan starts again in passes that each take the groups of one hash
    class: memory stays bounded at the price of reading the data once per pass.
    """
    out, files = _run_files(source)
    if not files:
        return StreamingEvaluation(gallery=gallery)
    files, counts = _plan(out, files)
    passes = 1
    while True:
        state = StreamingEvaluation(counts, gallery, max_open=MAX_OPEN_GROUPS if passes == 1 else None)
        try:
            for part in range(passes):
                _scan_run(out, files, state, passes, part)
            break
        except TooManyOpenGroups:
            passes = -(-len(counts) // MAX_OPEN_GROUPS) + 1
    state.passes = passes
    state.gallery_rows = _run_gallery_rows(out, state.extremes.picks())
    return state


def _hash_class(names: np.ndarray, passes: int) -> np.ndarray:
    """(n,) the pass each row's group belongs to: crc32 of its name, modulo ``passes``."""
    unique, inverse = np.unique(names, return_inverse=True)
    return np.array([zlib.crc32(str(u).encode()) % passes for u in unique.tolist()], np.int64)[inverse]


def _scan_run(out: Storage, files: list[str], state: "StreamingEvaluation", passes: int, part: int) -> None:
    dataset = pads.dataset(files, format="parquet", filesystem=out.fs)
    columns = [c for c in ("group", "status", *SCALARS, *CURVES) if c in dataset.schema.names]
    # Memory in flight: two files' current row groups, read column chunk by column chunk (pre-buffering whole
    # row groups held ~3x more here and was slower on local disks; object stores still get sequential reads).
    scanner = dataset.scanner(columns=columns, batch_size=BATCH_ROWS, batch_readahead=1, fragment_readahead=2,
                              fragment_scan_options=pads.ParquetFragmentScanOptions(pre_buffer=False))
    path, offset = None, 0
    for tagged in scanner.scan_batches():  # in order: fragments in file order, batches in row order
        batch = tagged.record_batch
        if tagged.fragment.path != path:
            path, offset = tagged.fragment.path, 0
        group = _strings(batch.column("group"))
        status = _strings(batch.column("status")) if "status" in columns else None
        has, rows = _metric_rows(batch)
        mine = np.ones(len(group), bool) if passes == 1 else _hash_class(group, passes) == part
        where = np.flatnonzero(has & mine) + offset  # rows stay named by their place in the file
        state.feed(group[mine], has[mine], rows[mine[has]], lambda j, where=where, path=path: (path, int(where[j])),
                   None if status is None else status[mine])
        offset += batch.num_rows


def _run_gallery_rows(out: Storage, picks: dict[str, list[tuple]]) -> dict[str, list[dict]]:
    """Reads the few gallery rows back (names, URIs, the mask PNG when the run stored it in Parquet)."""
    wanted = sorted({ref for side in picks.values() for _, ref, _ in side})
    found: dict[tuple, dict] = {}
    for path in sorted({p for p, _ in wanted}):
        dataset = pads.dataset(path, format="parquet", filesystem=out.fs)
        columns = [c for c in GALLERY_COLUMNS if c in dataset.schema.names]
        rows = sorted(r for p, r in wanted if p == path)
        for r, rec in zip(rows, dataset.take(pa.array(rows), columns=columns).to_pylist()):
            found[(path, r)] = rec
    result = {}
    for side, items in picks.items():
        result[side] = []
        for sm, ref, mae in items:
            rec = found.get(ref)
            if rec is None or rec.get("sm") != sm:  # a row that moved since the scan is left out, not mislabelled
                continue
            result[side].append({**rec, "sm": sm, "mae": mae})
    return result


# ---- maps -----------------------------------------------------------------------------------------------------

def map_groups(source: Source) -> list[str]:
    """The ground truth's groups: its top-level folders (hidden ones skipped), sorted."""
    gts = Storage(source.gt, source.options)
    entries = gts.fs.ls(gts.base, detail=True)
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                  if e["type"] == "directory" and not posixpath.basename(e["name"].rstrip("/")).startswith("."))


def _index(store: Storage, group: str) -> dict[str, str]:
    """<stem path inside the group> -> URL for the images of one group (hidden files and files without an image
    extension skipped). Of two files with one stem (``a.png``, ``a.jpg``) the PNG is taken, as the inference
    listing takes it for ground truth, so a run and its maps are scored against the same mask."""
    root = store.path(group)
    try:
        paths = store.fs.find(root)
    except FileNotFoundError:
        return {}
    found = {}
    for p in sorted(paths, key=_gt_preference):
        rel = posixpath.relpath(p, root)
        name = posixpath.basename(rel)
        if not name.startswith(".") and posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
            found.setdefault(posixpath.splitext(rel)[0], store.fs.unstrip_protocol(p))
    return found


def read_map(data: bytes) -> np.ndarray:
    """Prediction-map bytes -> (H, W) uint8, as pysodmetrics users read maps: ``cv2.imread(path,
    cv2.IMREAD_GRAYSCALE)`` (16-bit maps scaled to 8 bits, v >> 8; colour through OpenCV's gray conversion).
    Formats OpenCV cannot decode go through PIL, 16-bit ones scaled the same way."""
    pred = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE) if len(data) else None
    if pred is not None:
        return pred
    image = Image.open(io.BytesIO(data))
    if image.mode.startswith("I"):  # I;16, I;16B, I (PIL's convert("L") would clip these at 255)
        return np.clip(np.asarray(image, np.int64) >> 8, 0, 255).astype(np.uint8)
    return np.asarray(image.convert("L"))


def score_groups(batch: Mapping[str, np.ndarray], source: Source) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` over group names (or called directly): one row per ground-truth image with
    status ok | error | missing (no map for it), ``group_size`` (the group's rows), metrics (NaN when none)."""
    maps, gts = Storage(source.maps, source.options), Storage(source.gt, source.options)
    cols: dict[str, list] = {k: [] for k in ("group", "name", "mask_uri", "gt_uri", "status", "error", "group_size")}
    values: dict[str, list] = {k: [] for k in (*SCALARS, *CURVES)}
    for group in [str(g) for g in batch["group"]]:
        gt_index, pred_index = _index(gts, group), _index(maps, group)
        stems = sorted(gt_index)
        scored = [s for s in stems if s in pred_index]
        preds = dict(zip(scored, read_many([pred_index[s] for s in scored], source.options)))
        truths = dict(zip(scored, read_many([gt_index[s] for s in scored], source.options)))
        for stem in stems:
            metrics, status, error = None, "missing", None
            if stem in pred_index:
                try:
                    if isinstance(preds[stem], BaseException):
                        raise preds[stem]
                    metrics, status = image_metrics(read_map(preds[stem]), read_gt(truths[stem])), "ok"
                except Exception as exc:  # noqa: BLE001 - counted, not fatal
                    status, error = "error", f"{error_kind(exc)}: {exc}"
            for k, v in (("group", group), ("name", stem), ("mask_uri", pred_index.get(stem, "")),
                         ("gt_uri", gt_index[stem]), ("status", status), ("error", error or ""),
                         ("group_size", len(stems))):
                cols[k].append(v)
            for k in SCALARS:
                values[k].append(metrics[k] if metrics else np.nan)
            for k in CURVES:
                values[k].append(metrics[k] if metrics else np.full(CURVE_POINTS, np.nan))
    out = {k: np.array(v, dtype=np.int64 if k == "group_size" else object) for k, v in cols.items()}
    for k in SCALARS:
        out[k] = np.array(values[k], np.float64)
    for k in CURVES:
        out[k] = np.array(values[k], np.float64).reshape(-1, CURVE_POINTS)
    return out


def _maps_batches(source: Source, use_ray: bool) -> Iterator[Mapping[str, np.ndarray]]:
    groups = map_groups(source)
    if not groups:
        return
    if use_ray:
        import ray

        ds = ray.data.from_items([{"group": g} for g in groups])
        ds = ds.map_batches(score_groups, fn_kwargs={"source": source}, batch_size=1, batch_format="numpy")
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    else:
        for g in groups:
            yield score_groups({"group": np.array([g], dtype=object)}, source)


def evaluate_maps(source: Source, use_ray: bool = False, gallery: int = GALLERY) -> StreamingEvaluation:
    """Scores maps against the ground truth group by group (on Ray Data with ``use_ray``), streaming."""
    state = StreamingEvaluation(gallery=gallery)
    for batch in _maps_batches(source, use_ray):
        group = np.asarray(batch["group"], dtype=object)
        status = np.asarray(batch["status"], dtype=object)
        for name, size in zip(group.tolist(), np.asarray(batch["group_size"]).tolist()):
            state.expected.setdefault(name, int(size))
        has = status == "ok"
        rows = MetricSums.pack({k: np.asarray(batch[k])[has] for k in (*SCALARS, *CURVES)})
        picked = [np.asarray(batch[k], dtype=object)[has] for k in ("group", "name", "mask_uri", "gt_uri")]
        state.feed(group, has, rows, lambda j, picked=picked: tuple(str(c[j]) for c in picked),
                   status=status)
    picks = state.extremes.picks()
    state.gallery_rows = {side: [{"group": ref[0], "name": ref[1], "mask_uri": ref[2], "gt_uri": ref[3],
                                  "image_uri": find_image(source, ref[0], ref[1]), "sm": sm, "mae": mae}
                                 for sm, ref, mae in items]
                          for side, items in picks.items()}
    return state


def find_image(source: Source, group: str, stem: str) -> str | None:
    """The photo of a maps image for the gallery: ``<images>/<group>/<stem>.*`` (any extension), or None."""
    root = source.image_root()
    if not root:
        return None
    store = Storage(root, source.options)
    folder = store.path(group, posixpath.dirname(stem))
    try:
        entries = store.fs.ls(folder, detail=False)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return None
    for p in sorted(entries):
        if posixpath.splitext(posixpath.basename(p))[0] == posixpath.basename(stem):
            return store.fs.unstrip_protocol(p)
    return None


# ---- both -----------------------------------------------------------------------------------------------------

def evaluate(sources: list[Source], use_ray: bool = False, gallery: int = GALLERY) -> tuple[pd.DataFrame, dict]:
    """Returns (metrics table: one row per source x (dataset | group), details for the report)."""
    frames, details = [], {}
    for source in sources:
        state = evaluate_run(source, gallery) if source.run else evaluate_maps(source, use_ray, gallery)
        summary, groups = state.finish()
        dataset = dataset_name(source)
        base = {"label": source.label, "dataset": dataset}
        frames.append(pd.DataFrame([{
            **base, "scope": "dataset", "group": None, "images": summary["images"],
            "images_without_metrics": state.without_metrics, "errors": state.errors,
            "missing_predictions": state.missing,
            **{k: summary[k] for k in SUMMARY}, **{k: np.asarray(summary[k]).tolist() for k in CURVES}}]))
        if len(groups):
            frames.append(groups.assign(**base, scope="group"))
        details[source.label] = {"dataset": dataset, "summary": summary, "missing": state.missing,
                                 "source": source, "gallery": state.gallery_rows, "groups": len(groups),
                                 "rows": state.rows, "most_open_groups": state.most_open, "passes": state.passes}
    columns = ["label", "dataset", "scope", "group", "images", "images_without_metrics", "errors",
               "missing_predictions",
               *SUMMARY, *CURVES]
    metrics = pd.concat(frames, ignore_index=True).reindex(columns=columns)
    for k in CURVES:  # group rows have no curves: null, not NaN, in the Parquet
        metrics[k] = metrics[k].astype(object).where(metrics["scope"] == "dataset", None)
    return metrics, details


def write_metrics(output: str, options: dict, metrics: pd.DataFrame) -> str:
    """Writes metrics.parquet under ``output``; returns its URL. Written before the report is rendered, so that
    a report that fails does not lose the evaluation."""
    buf = io.BytesIO()
    metrics.to_parquet(buf, index=False)
    return Storage(output, options).write_bytes("metrics.parquet", buf.getvalue())


def write_report(output: str, options: dict, report_html: str) -> str:
    """Writes report.html under ``output``; returns its URL."""
    return Storage(output, options).write_bytes("report.html", report_html.encode())
