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


def finished_output(tmp_path, groups=("g",)):
    """An output as a finished run leaves it: a shard and record per group, a mask per image, the run files."""
    from pipeline.predictions import write_shard
    from pipeline.storage import Storage

    out = Storage(str(tmp_path / "out"), {})
    for run, group in enumerate(groups, 1):
        table = shard_rows(list(range(6)))
        table = table.set_column(0, "group_key", [[group] * 6])
        write_shard(out, run, table, "png")
        for i in range(6):
            out.write_bytes(f"masks/{group}/img_{i}.png", b"png")
    for key in ("_run.json", "_manifest.json"):
        out.write_json(key, {"run": len(groups)})
    out.write_bytes("_SUCCESS", b"")
    return out


def files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_record_whose_shard_is_gone_counts_for_nothing(tmp_path):
    """Records are what a resume reads; a shard deleted since (by hand, or by an --overwrite cut short) must not
    leave rows that are counted but not there: its record goes and its groups are done again."""
    from pipeline.output_state import remove_orphans
    from pipeline.predictions import record_key

    out = finished_output(tmp_path, ("g", "h"))
    root = tmp_path / "out"
    (gone,) = [r for r in OutputState.load(out).records if "h" in r["groups"]]
    (root / gone["shard"]).unlink()
    state, removed, lost = remove_orphans(out, OutputState.load(out))
    assert (removed, lost) == (0, 1)
    assert set(state.plans()) == {"g"} and state.counts()["rows"] == 6  # h has no rows: it is redone in full
    assert [p for p in files(root) if p.startswith("_commits/")] == [record_key(r["shard"]) for r in state.records]
    assert OutputState.load(out).counts() == state.counts()  # and the next load agrees


def test_an_overwrite_cut_short_leaves_no_record_a_resume_would_trust(tmp_path, monkeypatch):
    """--overwrite deletes _SUCCESS and the records before the shards: a delete that fails part-way (throttled,
    Ctrl-C) leaves shards without records, which the resume removes, never records without shards; _run.json
    goes last, so a re-run without --overwrite still compares settings."""
    import os

    from pipeline.output_state import clear_output, remove_orphans

    out = finished_output(tmp_path, ("g", "h"))
    root = tmp_path / "out"
    remove = os.remove

    def failing(path, *args, **kwargs):
        if "/predictions/" in str(path):
            raise TimeoutError("the delete timed out")
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", failing)
    with pytest.raises(TimeoutError):
        clear_output(out)
    monkeypatch.setattr(os, "remove", remove)
    left = files(root)
    assert "_SUCCESS" not in left and "_manifest.json" not in left and "_run.json" in left
    assert not [p for p in left if p.startswith("_commits/")]
    assert len([p for p in left if p.startswith("predictions/")]) == 2
    state, removed, lost = remove_orphans(out, OutputState.load(out))
    assert (removed, lost) == (2, 0) and state.plans() == {} and state.counts()["rows"] == 0
    assert files(root) == ["_run.json"]


def test_a_group_folder_named_like_a_tar_is_a_folder_not_an_orphan(tmp_path):
    from pipeline.output_state import remove_orphans

    out = finished_output(tmp_path, ("backup.tar",))
    state, removed, lost = remove_orphans(out, OutputState.load(out))
    assert (removed, lost) == (0, 0) and state.counts()["rows"] == 6
    assert (tmp_path / "out" / "masks" / "backup.tar" / "img_0.png").exists()


def test_a_write_cut_short_leaves_a_dot_file_that_readers_skip_and_the_next_run_removes(tmp_path, monkeypatch):
    """A local write is a temp file renamed into place; one cut off before the rename (a crash, Ctrl-C) leaves the
    temp file, which pyarrow's dataset discovery must skip (it skips names starting with '.' or '_'), and which
    the next run's settling or --overwrite removes."""
    import pyarrow.dataset as pads

    from pipeline.output_state import clear_output, remove_orphans
    from pipeline.predictions import write_shard

    out = finished_output(tmp_path)
    root = tmp_path / "out"
    mv, moves = out.fs.mv, []

    def cut_short(src, dst, **kw):
        moves.append(dst)
        if len(moves) in (1, 3):  # the first shard's rename; the second shard's record's rename
            raise KeyboardInterrupt
        return mv(src, dst, **kw)

    monkeypatch.setattr(out.fs, "mv", cut_short)
    for run in (2, 3):
        with pytest.raises(KeyboardInterrupt):
            write_shard(out, run, shard_rows([0, 1]).set_column(0, "group_key", [[f"new{run}"] * 2]), "png")
    monkeypatch.setattr(out.fs, "mv", mv)
    temps = [p for p in files(root) if ".tmp-" in p]
    assert len(temps) == 2 and {p.split("/")[0] for p in temps} == {"predictions", "_commits"}
    assert pads.dataset(str(root / "predictions"), format="parquet").to_table().num_rows == 6 + 2
    state, removed, lost = remove_orphans(out, OutputState.load(out))
    assert (removed, lost) == (3, 0)  # the two temp files and the shard whose record was never written
    assert not [p for p in files(root) if ".tmp-" in p] and state.counts()["rows"] == 6
    assert pads.dataset(str(root / "predictions"), format="parquet").to_table().num_rows == 6

    monkeypatch.setattr(out.fs, "mv", cut_short)
    moves.clear()
    with pytest.raises(KeyboardInterrupt):
        write_shard(out, 4, shard_rows([0]), "png")
    monkeypatch.setattr(out.fs, "mv", mv)
    clear_output(out)
    assert files(root) == []


def test_overwrite_and_resume_touch_only_the_names_the_job_gives(tmp_path):
    """Files of other tools in the job's folders - a PNG beside the group folders, a JSON beside the records, a
    Parquet file or tar named like ours but not by us - stay through --overwrite, and the resume neither reads them
    as records nor removes them as orphans."""
    from pipeline.output_state import clear_output, remove_orphans

    out = finished_output(tmp_path)
    root = tmp_path / "out"
    foreign = {"masks/reviewed/gt_fixed.png": b"png", "masks/overview.png": b"png", "masks/shard-mine.tar": b"tar",
               "_commits/notes.json": b'{"by": "a person"}', "predictions/part-foreign.parquet": b"parquet",
               "predictions/.part-r0001-0123456789abcdef.parquet.tmp-nothex!": b"x"}
    for key, data in foreign.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    state, removed, lost = remove_orphans(out, OutputState.load(out))
    assert (removed, lost) == (0, 0) and state.counts()["rows"] == 6
    clear_output(out)
    assert files(root) == sorted(foreign)
    assert all((root / key).read_bytes() == data for key, data in foreign.items())
