"""An output read back row by row, with the run that wrote each row (a shard's name carries it: part-r<run>-...,
kept by compaction), and what a re-run after a fault did: rows lost, duplicated, redone, transient errors left."""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.parquet as pq

RUN = re.compile(r"^part-r(\d+)-")
COLUMNS = ["group", "index", "name", "image_uri", "gt_uri", "mask_uri", "status", "error", "error_kind",
           "error_class"]


def output_rows(fs, root: str) -> pd.DataFrame:
    """Every row of every shard under ``<root>/predictions`` (each file read on its own), with ``run`` (from the
    shard's name), ``shard`` and ``key`` (group/name)."""
    fs.invalidate_cache()
    frames = []
    for path in sorted(fs.find(posixpath.join(root, "predictions"))):
        name = posixpath.basename(path)
        if not name.endswith(".parquet"):
            continue
        match = RUN.match(name)
        assert match, f"a shard without its run number: {name}"
        with fs.open(path, "rb") as f:
            frame = pq.read_table(f, columns=COLUMNS).to_pandas()
        frames.append(frame.assign(run=int(match.group(1)), shard=name))
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COLUMNS, "run", "shard"])
    return rows.assign(key=rows["group"] + "/" + rows["name"])


def by_key(rows: pd.DataFrame) -> pd.DataFrame:
    assert rows["key"].is_unique, rows[rows["key"].duplicated(keep=False)]
    return rows.set_index("key")


@dataclass
class Rerun:
    """A re-run compared with the run before it. ``changed_groups``: groups whose files changed in between
    (their images are all done again, by design: stage 1 compares every image of a group with the others)."""

    before: pd.DataFrame
    after: pd.DataFrame
    images_in: int  # images the re-run listed
    changed_groups: set = field(default_factory=set)

    @property
    def duplicates(self) -> int:
        return int(len(self.after) - self.after["key"].nunique())

    @property
    def lost(self) -> int:
        return self.images_in - int(self.after["key"].nunique())

    @property
    def redone(self) -> set[str]:
        """Rows written by a later run than the one that held them before (or new images)."""
        runs = dict(zip(self.before["key"], self.before["run"]))
        return {k for k, r in zip(self.after["key"], self.after["run"]) if k not in runs or r > runs[k]}

    @property
    def ok_redone(self) -> set[str]:
        before = self.before
        kept = before[(before["status"] == "ok") & ~before["group"].isin(self.changed_groups)]
        return self.redone & set(kept["key"])

    @property
    def transient_before(self) -> set[str]:
        return set(self.before.loc[self.before["error_class"] == "transient", "key"])

    @property
    def transient_left(self) -> set[str]:
        """Transient errors of the run before that are not ok now (gone from the input counts as resolved)."""
        status = dict(zip(self.after["key"], self.after["status"]))
        return {k for k in self.transient_before if k in status and status[k] != "ok"}
