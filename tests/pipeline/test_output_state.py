"""The output state a resume reads: spans per shard (O(groups), not O(images)) decide the same plans, counts and
superseded rows as resolving every index one by one."""
import random
from collections import Counter

import pytest

from pipeline.errors import PERMANENT, TRANSIENT
from pipeline.output_state import OutputState, _minus
from pipeline.predictions import ranges


def by_index(records: list[dict], listed: set[str] | None):
    """The plain reading: every index of every group, later runs winning."""
    records = sorted(records, key=lambda r: (r["run"], r["shard"]))
    latest, rows = {}, {}
    for r in records:
        for key, g in r["groups"].items():
            latest[key] = (g["n"], g["hash"])
    for r in records:
        for key, g in r["groups"].items():
            if (g["n"], g["hash"]) != latest[key]:
                continue
            for a, b in g["indices"]:
                for i in range(a, b):
                    rows.setdefault(key, {})[i] = (r["shard"], g["errors"].get(str(i)))
    plans, kinds = {}, Counter()
    for key, got in rows.items():
        n, h = latest[key]
        if set(got) != set(range(n)):
            plans[key] = (n, h, False, None, ())
            continue
        transient = tuple(sorted(i for i, (_, e) in got.items() if e and e[1] == TRANSIENT))
        permanent = tuple(sorted((i, e[2]) for i, (_, e) in got.items() if e and e[1] != TRANSIENT))
        plans[key] = (n, h, True, transient, permanent)
        kinds.update(e[0] for _, e in got.values() if e)
    counted = sum(len(v) for v in rows.values())
    superseded = {}
    for r in records:
        for key, g in r["groups"].items():
            keep = rows.get(key, {}) if listed is None or key in listed else {}
            for a, b in g["indices"]:
                for i in range(a, b):
                    if keep.get(i, (None,))[0] != r["shard"]:
                        superseded.setdefault(r["shard"], set()).add((key, i))
    errors = sum(1 for v in rows.values() for _, e in v.values() if e)
    return plans, counted, errors, superseded


def random_records(rng: random.Random) -> list[dict]:
    """Runs over a few groups: whole groups, groups cut off mid-way, transient errors redone, changed files."""
    sizes = {f"g{k}": rng.randint(1, 40) for k in range(6)}
    hashes = {k: "h0" for k in sizes}
    records = []
    for run in range(1, rng.randint(2, 5)):
        for s in range(rng.randint(1, 3)):
            groups = {}
            for key, n in sizes.items():
                if rng.random() < 0.3:
                    continue
                if rng.random() < 0.1:  # the group's files changed: other size, other digest
                    sizes[key] = n = rng.randint(1, 40)
                    hashes[key] = f"h{run}{s}"
                if rng.random() < 0.5:
                    chosen = range(n) if rng.random() < 0.5 else range(rng.randint(0, n - 1), n)
                else:
                    chosen = sorted(rng.sample(range(n), rng.randint(1, n)))
                errors = {}
                for i in chosen:
                    if rng.random() < 0.2:
                        errors[str(i)] = ["Read:OSError", rng.choice([TRANSIENT, PERMANENT]), rng.randint(0, 99)]
                groups[key] = {"n": n, "hash": hashes[key], "indices": ranges(chosen), "errors": errors}
            if groups:
                records.append({"run": run, "shard": f"predictions/part-r{run}-{s}.parquet", "groups": groups})
    return records


@pytest.mark.parametrize("seeds", [range(0, 100), range(100, 200)])
def test_spans_decide_what_every_index_decides(seeds):
    for seed in seeds:
        check(seed)


def check(seed: int) -> None:
    rng = random.Random(seed)
    records = random_records(rng)
    listed = None if seed % 3 else {f"g{k}" for k in range(6) if rng.random() < 0.7}
    plans, rows, errors, superseded = by_index(records, listed)
    state = OutputState(records)
    got = {k: (p.n, p.hash, p.complete, p.redo, p.permanent) for k, p in state.plans().items()}
    assert got == plans, seed
    counts = state.counts()
    assert (counts["rows"], counts["errors"]) == (rows, errors), seed
    assert counts["ok"] + counts["errors"] == counts["rows"]
    assert state.superseded(listed) == superseded, seed


def test_a_group_state_is_a_few_spans_not_an_entry_per_image():
    n = 10_000
    records = [{"run": 1, "shard": "predictions/part-a.parquet",
                "groups": {"big": {"n": n, "hash": "h", "indices": [[0, n]],
                                   "errors": {"7": ["Read:OSError", TRANSIENT, 10]}}}},
               {"run": 2, "shard": "predictions/part-b.parquet",
                "groups": {"big": {"n": n, "hash": "h", "indices": [[7, 8]], "errors": {}}}}]
    group = OutputState(records).groups["big"]
    assert group.spans == [(0, 7, "predictions/part-a.parquet"), (7, 8, "predictions/part-b.parquet"),
                           (8, n, "predictions/part-a.parquet")]
    assert group.errors == {} and group.complete() and group.rows() == n


def test_minus_keeps_the_parts_outside():
    assert _minus([(0, 10, "a"), (12, 20, "b")], [(2, 4), (9, 13), (19, 30)]) == \
        [(0, 2, "a"), (4, 9, "a"), (13, 19, "b")]
    assert _minus([[0, 5]], []) == [(0, 5)]
    assert _minus([[3, 5]], [(0, 10)]) == []


def shard_rows(indices, errors=None):
    """A shard's rows of group ``g`` (6 images): ``errors`` index -> error class."""
    import pyarrow as pa

    errors = errors or {}
    n = len(indices)
    return pa.table({"group_key": ["g"] * n, "index": pa.array(indices, pa.int32()),
                     "status": ["error" if i in errors else "ok" for i in indices],
                     "error_kind": ["Read:OSError" if i in errors else None for i in indices],
                     "error_class": [errors.get(i) for i in indices],
                     "image_bytes": pa.array([100] * n, pa.int64()), "group_size": pa.array([6] * n, pa.int32()),
                     "group_hash": ["h"] * n, "mask_key": [None] * n})


def test_compact_drops_superseded_rows_and_their_errors(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.predictions import write_shard
    from pipeline.storage import Storage

    rows = shard_rows
    out = Storage(str(tmp_path), {})
    first = write_shard(out, 1, rows(list(range(6)), {1: TRANSIENT, 4: PERMANENT}), "png")
    second = write_shard(out, 2, rows([1], {}), "png")  # the transient error, redone
    state = OutputState.load(out)
    doomed = state.superseded()
    assert doomed == {first["shard"]: {("g", 1)}}
    assert state.compact(out, doomed) == 1
    after = OutputState.load(out)
    kept = next(r for r in after.records if r["shard"] != second["shard"])
    assert kept["shard"] != first["shard"] and kept["replaces"] == first["shard"]  # rewritten under a new name
    assert kept["groups"]["g"]["indices"] == [[0, 1], [2, 6]] and set(kept["groups"]["g"]["errors"]) == {"4"}
    assert pq.read_table(tmp_path / kept["shard"]).column("index").to_pylist() == [0, 2, 3, 4, 5]
    assert not (tmp_path / first["shard"]).exists() and after.superseded() == {}
    assert after.counts()["rows"] == 6 and after.plans()["g"].permanent == ((4, 100),)


def test_a_compaction_that_died_before_deleting_the_old_record(tmp_path):
    """The new shard and record were written, the old record was not deleted yet: the old record must go with
    its shard, or it would count again once the shard that replaced it is compacted away in turn."""
    from pipeline.output_state import remove_orphans
    from pipeline.predictions import COMMITS, record_key, write_shard
    from pipeline.storage import Storage

    out = Storage(str(tmp_path), {})
    first = write_shard(out, 1, shard_rows(list(range(6))), "png")
    write_shard(out, 2, shard_rows([1]), "png")
    old_record = (tmp_path / record_key(first["shard"])).read_bytes()
    old_shard = (tmp_path / first["shard"]).read_bytes()
    state = OutputState.load(out)
    state.compact(out, state.superseded())
    (tmp_path / record_key(first["shard"])).write_bytes(old_record)
    (tmp_path / first["shard"]).write_bytes(old_shard)  # the job died here

    state = OutputState.load(out)
    assert state.stale == [first["shard"]] and state.counts()["rows"] == 6
    remove_orphans(out, state)
    assert not (tmp_path / first["shard"]).exists()
    assert sorted(f"{COMMITS}/{p.name}" for p in (tmp_path / COMMITS).iterdir()) == sorted(
        record_key(r["shard"]) for r in state.records)
    # a third run redoes every image: both shards left are compacted away, and nothing else comes back
    write_shard(out, 3, shard_rows(list(range(6))), "png")
    state = OutputState.load(out)
    state.compact(out, state.superseded())
    after = OutputState.load(out)
    assert [r["run"] for r in after.records] == [3] and after.counts()["rows"] == 6 and after.stale == []


def test_another_spelling_of_the_same_input_resumes(tmp_path, monkeypatch):
    """``in/`` then ``in`` (or the absolute path, or file://) is one input: the resume must not be refused (its
    only remedy, --overwrite, deletes the finished work); another input still is. A run recorded before
    locations were canonical (``input`` as typed) compares like for like."""
    from pipeline.output_state import OtherSettingsError, check_settings
    from pipeline.storage import Storage, canonical_location

    monkeypatch.chdir(tmp_path)
    out = Storage(str(tmp_path / "out"))
    out.write_json("_run.json", {"settings": {"input": "data/in/", "crf": "coca"}, "run": 3})
    for spelling in ("data/in", "./data/in/", str(tmp_path / "data" / "in"), f"file://{tmp_path}/data/in/"):
        assert check_settings(out, {"input": canonical_location(spelling), "crf": "coca"}, "out") == 4
    with pytest.raises(OtherSettingsError, match="input"):
        check_settings(out, {"input": canonical_location("data/other"), "crf": "coca"}, "out")
    assert canonical_location("s3://b/in/") == canonical_location("s3://b/in") == "s3://b/in"
