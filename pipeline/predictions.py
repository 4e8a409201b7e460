"""The predictions table: its schema, and the Ray Data sink that writes it in shards with a commit record each.

Shards (``predictions/part-r<run>-<digest>.parquet``) hold a bounded number of rows (``rows_per_shard``, whole
blocks: a group's rows from one batch stay together), each written once, complete, then committed by a small record
``_commits/<shard>.json`` that says which rows of which groups it holds (and which of them are errors). Resume,
counts and the manifest read the records, never the shards. The shard's name is a digest of the rows it holds, so
a write task that Ray retries writes the same object again. With ``--mask-format webdataset`` the sink also
writes the masks of its rows as one tar beside it (``masks/shard-r<run>-<digest>.tar``, members
``<group>/<stem>.png``, a stem's dots replaced: ``tar_member``); with ``parquet`` the PNG bytes stay in a
``mask_png`` column.
"""
from __future__ import annotations

import hashlib
import io
import posixpath
import re
import tarfile
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import Datasink

from scosparc_core.metrics import CURVE_POINTS, CURVES, SCALARS

from .storage import Storage

MASK_FORMATS = ("png", "parquet", "webdataset")
COMMITS = "_commits"
# The names the job gives its files (a compaction extends a shard's stem with -c<rows dropped>): only these are
# the job's to delete; other files in its folders belong to other tools.
_STEM = r"part-r\d{4,}-[0-9a-f]{16}(?:-c\d+)*"
SHARD_NAME = re.compile(rf"^{_STEM}\.parquet$")
RECORD_NAME = re.compile(rf"^{_STEM}\.json$")
TAR_NAME = re.compile(r"^shard-r\d{4,}-[0-9a-f]{16}\.tar$")

CURVE = pa.list_(pa.float64(), CURVE_POINTS)
SCHEMA = pa.schema(
    [
        ("group", pa.string()),
        ("group_key", pa.string()),  # the group's safe name under --output
        ("index", pa.int32()),  # the image's position in its group (sorted by URI)
        ("name", pa.string()),
        ("image_uri", pa.string()),
        ("image_bytes", pa.int64()),  # size of the input object when listed (-1 unknown)
        ("gt_uri", pa.string()),
        ("mask_uri", pa.string()),  # PNG URL; <tar URL>#<member> with webdataset; null with parquet
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("status", pa.string()),  # ok | error
        ("error", pa.string()),
        ("error_kind", pa.string()),
        ("error_class", pa.string()),  # permanent | transient (errors only)
        ("threshold", pa.float64()),  # the group's tau
        ("confidence", pa.float64()),  # the group's c
        ("image_confidence", pa.float64()),
        ("regions_found", pa.int32()),
        ("regions_kept", pa.int32()),
        ("fallback", pa.bool_()),  # no stage-1 region: the mask is the continuous stage-1 map
        ("foreground_fraction", pa.float64()),  # share of mask pixels >= 128 at original size
        ("decode_s", pa.float64()),
        # backbone + stage 1 + region filter (+ GPU CRF; a group in passes: its later reads too), per image of
        # the work that gave the row (a batch of groups, or a part of a group in passes): the ok rows sum to the
        # engine's time
        ("stage1_s", pa.float64()),
        ("crf_s", pa.float64()),  # the CPU CRF (pydensecrf); 0 when it ran on the GPU
        ("write_s", pa.float64()),
        ("gt_error", pa.string()),
        *[(k, pa.float64()) for k in SCALARS],
        *[(k, CURVE) for k in CURVES],
    ]
)
# Columns that travel from the refine stage to the sink: the PNG bytes (kept with --mask-format parquet), and what
# the commit record needs (dropped from the shard).
TRAVELLING = [("mask_png", pa.binary()), ("mask_key", pa.string()), ("group_size", pa.int32()),
              ("group_hash", pa.string())]
ROW_SCHEMA = pa.schema([*SCHEMA, *[pa.field(k, t) for k, t in TRAVELLING]])


def group_hash(names) -> str:
    """A digest of a group's image names in order: a group whose files changed is a new group."""
    return hashlib.sha1("\n".join(names).encode()).hexdigest()[:16]


def ranges(indices) -> list[list[int]]:
    """Sorted indices -> [[start, stop), ...]."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def from_ranges(spans) -> list[int]:
    return [i for a, b in spans for i in range(a, b)]


def commit_record(shard: str, run: int, table: pa.Table, tar: str | None = None) -> dict:
    """The record of one shard: per group its size and name digest, the indices of its rows here (as ranges)
    and its error rows (index -> [kind, class, input bytes])."""
    cols = table.select(["group_key", "index", "status", "error_kind", "error_class", "image_bytes",
                         "group_size", "group_hash"]).to_pydict()
    groups: dict[str, dict] = {}
    for key, idx, status, kind, cls, size, n, h in zip(*cols.values()):
        g = groups.setdefault(key, {"n": int(n), "hash": h, "indices": [], "errors": {}})
        g["indices"].append(int(idx))
        if status != "ok":
            g["errors"][str(idx)] = [kind, cls, int(size if size is not None else -1)]
    for g in groups.values():
        g["indices"] = ranges(g["indices"])
    return {"shard": shard, "tar": tar, "run": run, "rows": table.num_rows, "groups": groups}


def write_shard(out: Storage, run: int, table: pa.Table, mask_format: str) -> dict:
    """Writes one shard (and its tar of masks) and then its commit record. Returns the record."""
    keys = table.select(["group_key", "index"]).to_pydict()
    digest = hashlib.sha1("\n".join(f"{k}/{i}" for k, i in zip(keys["group_key"], keys["index"])).encode())
    name = f"part-r{run:04d}-{digest.hexdigest()[:16]}"
    tar = None
    if mask_format == "webdataset":
        tar = f"masks/shard-r{run:04d}-{digest.hexdigest()[:16]}.tar"
        table = _with_tar(out, tar, table)
    record = commit_record(f"predictions/{name}.parquet", run, table, tar)
    dropped = ["mask_key", "group_size", "group_hash"] + ([] if mask_format == "parquet" else ["mask_png"])
    data = table.drop_columns([c for c in dropped if c in table.column_names])
    buf = io.BytesIO()
    pq.write_table(data, buf, row_group_size=2048)  # readers hold a row group at a time
    out.write_bytes(record["shard"], buf.getvalue())
    out.write_json(record_key(record["shard"]), record)  # last: a shard is committed when its record exists
    return record


def _with_tar(out: Storage, tar_key: str, table: pa.Table) -> pa.Table:
    """Writes the rows' mask PNGs as one tar (webdataset: member <key>.png) and points mask_uri into it."""
    cols = table.select(["mask_png", "mask_key"]).to_pydict()
    buf = io.BytesIO()
    uris = []
    tar_url = out.url(tar_key)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for png, key in zip(cols["mask_png"], cols["mask_key"]):
            if png is None:
                uris.append(None)
                continue
            member = tar_member(key)
            info = tarfile.TarInfo(member)
            info.size = len(png)
            tar.addfile(info, io.BytesIO(png))
            uris.append(f"{tar_url}#{member}")
    out.write_bytes(tar_key, buf.getvalue())
    i = table.column_names.index("mask_uri")
    return table.set_column(i, "mask_uri", pa.array(uris, pa.string()))


def tar_member(mask_key: str) -> str:
    """A mask's member name in a tar: its key under masks/, with no dot in its stem. webdataset's sample key is
    the name up to the first dot of the basename, so members ``cam1.frame1.png`` and ``cam1.frame2.png`` would be
    one sample ``cam1`` with fields ``frame1.png`` and ``frame2.png``. A stem with dots gets them replaced and a
    short digest of the stem as it was, so two stems never meet; the rows keep the image's group and name, and
    mask_uri names the member."""
    folder, name = posixpath.split(mask_key.removeprefix("masks/"))
    stem = name.removesuffix(".png")
    if "." in stem:
        stem = f"{stem.replace('.', '_')}~{hashlib.sha1(stem.encode()).hexdigest()[:8]}"
    return posixpath.join(folder, f"{stem}.png")


@dataclass
class PredictionsSink(Datasink):
    """Ray Data sink: bundles of at least ``rows_per_shard`` rows -> one shard + record each. The records come
    back to the driver (``records``) when the write completes."""

    output: str
    storage_options: dict
    run: int
    rows_per_shard: int = 10_000
    mask_format: str = "png"
    records: list = field(default_factory=list)

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks, ctx) -> dict:
        tables = [b if isinstance(b, pa.Table) else pa.Table.from_pandas(b) for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return {}
        table = pa.concat_tables(tables).cast(ROW_SCHEMA) if len(tables) > 1 else tables[0].cast(ROW_SCHEMA)
        return write_shard(Storage(self.output, self.storage_options), self.run, table, self.mask_format)

    def on_write_complete(self, write_result) -> None:
        self.records = [r for r in write_result.write_returns if r]

    def get_name(self) -> str:
        return "Predictions"


def record_key(shard: str) -> str:
    """``predictions/<stem>.parquet`` -> the key of its commit record, ``_commits/<stem>.json``."""
    return f"{COMMITS}/{posixpath.basename(shard).removesuffix('.parquet')}.json"
