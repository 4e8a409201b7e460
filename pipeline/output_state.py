"""What an output folder holds: the run's settings, the commit records of its shards, and what follows from them.

A re-run of the same job reads the records (and lists the shards, never reads them: a record whose shard is gone
counts for nothing) to decide, per group, what is left:

- a group with no rows, or whose files changed since (other count or names), or with rows missing (a run that
  died mid-group): done again, all of it;
- a complete group with transient errors, or with a permanent error on an input whose size has changed since (a
  truncated upload that completed later): stage 1 runs on the whole group again (it needs every image), and only
  those images get new rows;
- anything else is done.

Rows are never rewritten in place: a later run's row for an image supersedes the earlier one, and ``compact``
rewrites the few shards that hold superseded rows (at the start and the end of every run, so nothing is ever
counted twice). The state is read on the driver and holds O(records + groups + error rows), not O(images);
``groups_to_do`` applies its plans to the listing in Ray Data tasks (a light module: those tasks' workers import
this one, not the model's torch and timm).
"""
from __future__ import annotations

import bisect
import io
import json
import os
import posixpath
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import TRANSIENT
from .predictions import COMMITS, RECORD_NAME, SHARD_NAME, TAR_NAME, from_ranges, group_hash, ranges, record_key
from .storage import TEMP, Storage, canonical_location, redact

RUN_FILE = "_run.json"
# The job's own names in each of its folders (files of other tools beside them are never touched).
NAMES = {"predictions": SHARD_NAME, COMMITS: RECORD_NAME, "masks": TAR_NAME}


class OtherSettingsError(RuntimeError):
    """The output holds a run with other settings: resuming would mix results (nothing was written)."""


@dataclass(frozen=True)
class GroupPlan:
    """What a re-run does with one group: ``redo`` None = everything; otherwise only those image indices (their
    stage 1 runs on the whole group). ``permanent``: index -> input size of its permanent error, redone when the
    input's size changed."""

    n: int
    hash: str
    complete: bool
    redo: tuple[int, ...] | None
    permanent: tuple[tuple[int, int], ...] = ()


class OutputState:
    """The commit records under an output, resolved into effective rows per group."""

    def __init__(self, records: list[dict]):
        self.records = sorted(records, key=lambda r: (r["run"], r["shard"]))
        replaced = {r.get("replaces") for r in self.records if r.get("replaces")}
        # records of compacted shards that a compaction died before deleting: ``remove_orphans`` deletes them,
        # or they would count again once the shard that replaced them is itself compacted away
        self.stale = [r["shard"] for r in self.records if r["shard"] in replaced]
        self.records = [r for r in self.records if r["shard"] not in replaced]
        self._resolve()

    @classmethod
    def load(cls, out: Storage) -> "OutputState":
        return cls(load_records(out))

    def _resolve(self) -> None:
        """Per group: the latest run's size and hash, and which shard holds the row that counts for each index."""
        entries: dict[str, list] = defaultdict(list)
        for r in self.records:
            for key, g in r["groups"].items():
                entries[key].append((r["shard"], g))
        self.groups: dict[str, GroupRows] = {}
        for key, items in entries.items():
            n, h = items[-1][1]["n"], items[-1][1]["hash"]
            rows = GroupRows(n, h)
            for shard, g in items:  # sorted by run: later rows overwrite earlier ones
                if g["hash"] == h and g["n"] == n:  # else the group's files changed since: superseded
                    rows.put(shard, g["indices"], g["errors"])
            self.groups[key] = rows

    # -- what is left to do ------------------------------------------------------------------------------------
    def plans(self) -> dict[str, GroupPlan]:
        """group key -> GroupPlan, for every group that has rows; groups without an entry are done in full."""
        out = {}
        for key, rows in self.groups.items():
            if not rows.complete():
                out[key] = GroupPlan(rows.n, rows.hash, False, None)
                continue
            errors = sorted(rows.errors.items())
            transient = tuple(i for i, (_, e) in errors if e[1] == TRANSIENT)
            permanent = tuple((i, e[2]) for i, (_, e) in errors if e[1] != TRANSIENT)
            out[key] = GroupPlan(rows.n, rows.hash, True, transient, permanent)
        return out

    # -- superseded rows ---------------------------------------------------------------------------------------
    def superseded(self, listed: set[str] | None = None) -> dict[str, set[tuple[str, int]]]:
        """shard -> the (group key, index) rows it holds that a later row supersedes, or whose group is no
        longer in the input (``listed``: the input's group keys; None: keep every group)."""
        out: dict[str, set] = defaultdict(set)
        for r in self.records:
            for key, g in r["groups"].items():
                rows = self.groups.get(key) if listed is None or key in listed else None
                owned = rows.spans_of(r["shard"]) if rows else []
                for a, b in _minus(g["indices"], owned):
                    out[r["shard"]].update((key, i) for i in range(a, b))
        return dict(out)

    def compact(self, out: Storage, doomed: dict[str, set[tuple[str, int]]]) -> int:
        """Rewrites every shard in ``doomed`` (``superseded()``) without those rows (new shard and record first,
        then the old ones go), so readers of predictions/ see each input image once and no other. Returns the
        rows dropped."""
        dropped = 0
        by_shard = {r["shard"]: r for r in self.records}
        for shard, rows in doomed.items():
            record = by_shard[shard]
            table = pq.read_table(io.BytesIO(out.fs.cat_file(out.path(shard))))
            keys = pa.array([f"{k}/{i}" for k, i in rows])
            row_keys = pc.binary_join_element_wise(table.column("group_key"),
                                                   pc.cast(table.column("index"), pa.string()), "/")
            kept = table.filter(pc.invert(pc.is_in(row_keys, value_set=keys)))
            dropped += table.num_rows - kept.num_rows
            stem = posixpath.basename(shard).removesuffix(".parquet")  # the new shard's name extends it
            if kept.num_rows:
                new_shard = f"predictions/{stem}-c{len(rows)}.parquet"
                buf = io.BytesIO()
                pq.write_table(kept, buf, row_group_size=2048)
                out.write_bytes(new_shard, buf.getvalue())
                new_record = _subset_record(record, new_shard, rows)
                out.write_json(record_key(new_shard), new_record)
            out.remove(record_key(shard))
            out.remove(shard)
        return dropped

    # -- counts ------------------------------------------------------------------------------------------------
    def counts(self) -> dict:
        """Rows, ok, errors (permanent / transient) and errors by kind over the effective rows."""
        rows = transient = 0
        kinds: Counter = Counter()
        for group in self.groups.values():
            rows += group.rows()
            for _, error in group.errors.values():
                kinds[error[0]] += 1
                transient += error[1] == TRANSIENT
        errors = sum(kinds.values())
        return {"rows": rows, "ok": rows - errors, "errors": errors, "transient_errors": transient,
                "permanent_errors": errors - transient, "errors_by_kind": dict(sorted(kinds.items()))}


class GroupRows:
    """The rows that count for one group, as spans of indices per shard, and its error rows: O(shards and errors
    of the group), not O(images), so a 10M-image output's state fits a driver."""

    __slots__ = ("n", "hash", "spans", "errors")

    def __init__(self, n: int, group_hash: str):
        self.n, self.hash = n, group_hash
        self.spans: list[tuple[int, int, str]] = []  # sorted, disjoint [start, stop) -> shard
        self.errors: dict[int, tuple[str, list]] = {}  # index -> (shard, [kind, class, input bytes])

    def put(self, shard: str, indices: list, errors: dict) -> None:
        """A later shard's rows (``indices``: sorted [start, stop) ranges) overwrite whatever held them before."""
        new = [(a, b) for a, b in indices]
        self.spans = sorted(_minus(self.spans, new) + [(a, b, shard) for a, b in new])
        if self.errors:
            starts = [a for a, _ in new]
            for i in list(self.errors):
                k = bisect.bisect_right(starts, i) - 1
                if k >= 0 and i < new[k][1]:
                    del self.errors[i]
        for i, error in errors.items():
            self.errors[int(i)] = (shard, error)

    def spans_of(self, shard: str) -> list[tuple[int, int]]:
        return [(a, b) for a, b, s in self.spans if s == shard]

    def rows(self) -> int:
        return sum(b - a for a, b, _ in self.spans)

    def complete(self) -> bool:
        """Every index 0..n-1 has a row (spans are disjoint and sorted, so they must tile [0, n))."""
        end = 0
        for a, b, _ in self.spans:
            if a != end:
                return False
            end = b
        return end == self.n


def _minus(spans: list, remove: list) -> list[tuple]:
    """The parts of ``spans`` ((start, stop, *rest)) outside ``remove`` ((start, stop)); both sorted, disjoint
    [start, stop) ranges; one pass. Each part keeps its span's rest."""
    out, k = [], 0
    for a, b, *rest in spans:
        while k < len(remove) and remove[k][1] <= a:
            k += 1
        j = k
        while j < len(remove) and remove[j][0] < b:
            x, y = remove[j]
            if x > a:
                out.append((a, x, *rest))
            a = max(a, y)
            j += 1
        if a < b:
            out.append((a, b, *rest))
    return out


def _subset_record(record: dict, shard: str, dropped: set[tuple[str, int]]) -> dict:
    groups = {}
    for key, g in record["groups"].items():
        keep = [i for i in from_ranges(g["indices"]) if (key, i) not in dropped]
        if keep:
            groups[key] = {**g, "indices": ranges(keep),
                           "errors": {k: v for k, v in g["errors"].items() if (key, int(k)) not in dropped}}
    return {**record, "shard": shard, "rows": sum(len(from_ranges(g["indices"])) for g in groups.values()),
            "groups": groups, "replaces": record["shard"]}


def load_records(out: Storage, threads: int = 32) -> list[dict]:
    """Every commit record under ``out`` (files of other tools in _commits/ are not records)."""
    folder = out.path(COMMITS)
    if not out.fs.exists(folder):
        return []
    paths = [p for p in out.fs.ls(folder, detail=False) if RECORD_NAME.match(posixpath.basename(p))]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda p: json.loads(out.fs.cat_file(p)), paths))


def ours(folder: str, rel: str, groups=frozenset()) -> bool:
    """Whether the job wrote ``rel`` (a path under ``folder``): its shards, records and tars by name, the PNGs
    under the group folders in ``groups``, and the temp files of interrupted writes of any of those."""
    name = posixpath.basename(rel)
    temp = TEMP.match(name)
    name = temp["target"] if temp else name
    if folder == "masks" and "/" in rel:
        return rel.split("/", 1)[0] in groups and name.endswith(".png")
    return "/" not in rel and bool(NAMES[folder].match(name))


def remove_orphans(out: Storage, state: OutputState) -> tuple[OutputState, int, int]:
    """Brings files and records into line, with one listing each of predictions/, masks/ and _commits/ (O(shards
    and groups), not O(images)):

    - a record whose shard (or tar) is gone (an --overwrite cut short, a shard deleted by hand) is deleted and left
      out of the state: its groups are redone, and no _SUCCESS is written for rows that are not there;
    - shards and tars without a record (a write that died half-way) are deleted, and so are the temp files of
      interrupted writes and the records of shards a compaction replaced (it died between writing the new record
      and deleting the old one).

    Returns the state without the lost records, the files removed and the records lost."""
    files: dict[str, dict[str, str]] = {}
    for folder in NAMES:
        entries = out.fs.ls(out.path(folder), detail=True) if out.exists(folder) else []
        # only files: a group folder may be named like a tar (masks/scene.tar/)
        files[folder] = {posixpath.basename(e["name"]): e["name"] for e in entries if e["type"] == "file"}
    present = {f"{folder}/{name}" for folder, names in files.items() for name in names}
    lost = {r["shard"] for r in state.records
            if r["shard"] not in present or (r.get("tar") and r["tar"] not in present)}
    if lost:
        state = OutputState([r for r in state.records if r["shard"] not in lost])
    committed = {r["shard"] for r in state.records} | {r["tar"] for r in state.records if r.get("tar")}
    orphans = [path for folder, names in files.items() for name, path in names.items() if ours(folder, name)
               and (TEMP.match(name) or (folder != COMMITS and f"{folder}/{name}" not in committed))]
    out.delete([out.path(record_key(shard)) for shard in [*state.stale, *sorted(lost)]] + orphans)
    return state, len(orphans), len(lost)


def check_settings(out: Storage, fingerprint: dict, output_url: str) -> int:
    """A re-run must share the settings that change results. Returns this run's number (1 for a new output)."""
    if not out.exists(RUN_FILE):
        return 1
    before = out.read_json(RUN_FILE)
    settings = dict(before.get("settings", {}))
    for key in ("input", "manifest"):  # runs recorded before locations were canonical: compare like for like
        if isinstance(settings.get(key), str):
            settings[key] = canonical_location(settings[key])
    now = json.loads(json.dumps(redact(fingerprint), default=str))
    diff = sorted(k for k in set(settings) | set(now) if settings.get(k) != now.get(k))
    if diff:
        detail = "; ".join(f"{k}: {settings.get(k)!r} -> {now.get(k)!r}" for k in diff[:6])
        raise OtherSettingsError(
            f"{output_url} holds a run with other settings ({detail}); resuming would mix results. "
            "Give the recorded settings again to resume it, or use --overwrite (which deletes its results), or "
            "another --output."
        )
    return int(before.get("run", 0)) + 1


def clear_output(out: Storage) -> None:
    """--overwrite: deletes what this job writes and nothing else (``ours``: files of other tools beside them
    stay, and so does the lease; a PNG put inside a group folder cannot be told from a mask and goes). The order
    leaves an output a re-run can resume if it stops part-way: _SUCCESS and the manifest first, then the commit
    records (so the shards left are orphans that a resume removes, never rows it trusts), the masks of the
    recorded groups and the tars, the shards, and _run.json last (a re-run without --overwrite still compares
    settings). Deletes go to the store in bulk (S3: 1,000 keys per request, requests in parallel)."""
    out.fs.invalidate_cache()
    groups = {key for r in load_records(out) for key in r["groups"]}
    out.remove("_SUCCESS")
    out.remove("_manifest.json")
    for folder in (COMMITS, "masks", "predictions"):
        root = out.path(folder)
        if not out.fs.exists(root):
            continue
        doomed = [p for p in out.fs.find(root) if ours(folder, p[len(root):].lstrip("/"), groups)]
        out.delete(doomed)
        if out.is_local:  # folders emptied here go too (never above the folder); object stores have none
            dirs = {root}
            for path in doomed:
                d = posixpath.dirname(path)
                while len(d) > len(root):
                    dirs.add(d)
                    d = posixpath.dirname(d)
            for d in sorted(dirs, key=len, reverse=True):
                try:
                    os.rmdir(d)
                except OSError:
                    pass  # not empty: something else lives there
    out.remove(RUN_FILE)


_PLANS: dict = {}  # a task worker's copy of the plans, fetched once per job (keyed by the object ref)


def mark_todo(row: dict, plans_ref) -> list[dict]:
    """One listed group -> [the row to process] (with its name digest, the images to emit rows for: ``only``,
    empty = all, and how many rows that is), or [] when it is done."""
    import ray

    key = plans_ref.hex() if plans_ref is not None else None
    if key not in _PLANS:
        _PLANS.clear()
        _PLANS[key] = ray.get(plans_ref) if plans_ref is not None else {}
    names = list(row["names"])
    n = len(names)
    if n == 0:
        return []
    h = group_hash(names)
    plan = _PLANS[key].get(str(row["group_key"]))
    only: list[int] = []
    if plan is not None and plan.complete and plan.n == n and plan.hash == h:
        sizes = list(row["image_bytes"])
        redo = set(plan.redo or ())
        redo |= {i for i, size in plan.permanent if i < n and size >= 0 and sizes[i] >= 0 and sizes[i] != size}
        if not redo:
            return []
        only = sorted(redo)
    return [{**row, "group_hash": h, "only": only, "group_rows": len(only) or n}]


def groups_with_images(batch):
    """Ray Data ``map_batches`` over listed groups: the keys of those with images. A group folder emptied since
    the last run is no longer in the input, so its old rows go, as a deleted group's do."""
    has_images = pc.greater(pc.list_value_length(batch.column("names")), 0)
    return pa.table({"group_key": batch.column("group_key").filter(has_images)})


def groups_to_do(batch, plans_ref):
    """Ray Data ``map_batches`` over listed groups: the groups left to do."""
    import pyarrow as pa

    return pa.Table.from_pylist([r for row in batch.to_pylist() for r in mark_todo(row, plans_ref)])
