import gzip
import posixpath

import pandas as pd
import pytest
from conftest import make_bucket

from pipeline.listing import (InputSpec, _listing_fs, check_input, group_dataset, group_row, list_group,
                              list_layout, list_manifest, resolve_layout, summarize)
from pipeline.storage import Storage, redact, redact_url, safe_component


def touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_cosod_layout_with_optional_ground_truth(tmp_path):
    touch(tmp_path / "image/cat/a.jpg")
    touch(tmp_path / "image/cat/b.jpg")
    touch(tmp_path / "image/dog/c.png")
    touch(tmp_path / "image/dog/.DS_Store")
    touch(tmp_path / "groundtruth/cat/a.png")
    groups = list_layout(Storage(str(tmp_path)))
    assert [g.group for g in groups] == ["cat", "dog"]
    cat = groups[0].images
    assert [im.name for im in cat] == ["a.jpg", "b.jpg"]
    assert cat[0].gt_uri.endswith("groundtruth/cat/a.png") and cat[1].gt_uri is None
    assert [im.mask_key for im in cat] == ["masks/cat/a.png", "masks/cat/b.png"]
    assert len(groups[1].images) == 1  # the hidden file is not an input


def test_groups_directly_under_the_root(tmp_path):
    touch(tmp_path / "g1/x.jpg")
    touch(tmp_path / "g2/y.jpg")
    groups = list_layout(Storage(str(tmp_path)))
    assert [(g.group, len(g.images)) for g in groups] == [("g1", 1), ("g2", 1)]


def test_duplicate_stems_and_unsafe_names_get_distinct_safe_keys(tmp_path):
    touch(tmp_path / "image/g/a.jpg")
    touch(tmp_path / "image/g/a.png")
    touch(tmp_path / "image/..evil/x y ü.jpg")
    groups = {g.group: g for g in list_layout(Storage(str(tmp_path)))}
    keys = [im.mask_key for im in groups["g"].images]
    assert keys == ["masks/g/a_jpg.png", "masks/g/a_png.png"]
    evil = groups["..evil"].images[0].mask_key
    assert ".." not in evil.split("/") and evil.startswith("masks/") and evil.endswith("/x y ü.png")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_with_relative_and_absolute_uris(tmp_path, fmt):
    touch(tmp_path / "data/a.jpg")
    frame = pd.DataFrame({"group": ["g", "g"], "image_uri": ["data/a.jpg", str(tmp_path / "data/a.jpg")],
                          "gt_uri": [None, "data/a_gt.png"]})
    path = tmp_path / f"m.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path)
    (g,) = list_manifest(str(path), {})
    assert len(g.images) == 2 and all(im.image_uri.endswith("data/a.jpg") for im in g.images)
    assert len({im.mask_key for im in g.images}) == 2  # the same file listed twice still gets two outputs
    assert sum(im.gt_uri is not None for im in g.images) == 1


def test_manifest_missing_columns(tmp_path):
    path = tmp_path / "m.csv"
    pd.DataFrame({"image": ["a.jpg"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="missing column"):
        list_manifest(str(path), {})


def test_safe_component():
    assert safe_component("cat") == "cat"
    for bad in ["..", "../x", "a/b", "a\\b", "", " .hidden", "a\x00b"]:
        out = safe_component(bad)
        assert "/" not in out and "\\" not in out and out not in ("", ".", "..") and not out.startswith(".")
    assert safe_component("a/b") != safe_component("a_b")


def test_redaction():
    assert redact_url("s3://AKIA:SECRET@bucket/k") == "s3://bucket/k"
    url = redact_url("https://h/x.jpg?X-Amz-Signature=abc&X-Amz-Credential=def&v=1")
    assert "abc" not in url and "def" not in url and "v=1" in url
    cfg = redact({"storage_options": {"key": "AKIA", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://e"}}})
    assert cfg["storage_options"]["key"] == "REDACTED" and cfg["storage_options"]["secret"] == "REDACTED"
    assert cfg["storage_options"]["client_kwargs"]["endpoint_url"] == "http://e"


# --- listing at scale: the same groups as the sequential walk, in parallel, on the driver or in Ray tasks ------


def sequential_listing(storage):
    """The listing this module had before (one recursive walk of image/ and one of groundtruth/), kept here as
    the reference the parallel listing must reproduce."""
    from pipeline.listing import GroupSpec, ImageSpec, _hidden, _relative, _stem, finish

    fs = storage.fs
    if fs.isdir(storage.path("image")):
        image_root, gt_root = storage.path("image"), storage.path("groundtruth")
    else:
        image_root, gt_root = storage.base, None
    files = [p for p in fs.find(image_root) if not p.endswith("/") and not _hidden(_relative(p, image_root))]
    folders = [_relative(e["name"], image_root).rstrip("/") for e in fs.ls(image_root, detail=True)
               if e["type"] == "directory"]
    gts = {}
    if gt_root and fs.isdir(gt_root):
        for p in sorted(fs.find(gt_root), key=lambda p: (not p.lower().endswith(".png"), p)):
            rel = _relative(p, gt_root)
            if not p.endswith("/") and not _hidden(rel):
                gts.setdefault(_stem(rel), p)
    groups = {name: GroupSpec(name) for name in folders if name}
    for p in sorted(files):
        rel = _relative(p, image_root)
        group, _, name = rel.partition("/") if "/" in rel else ("", "", rel)
        spec = groups.setdefault(group, GroupSpec(group))
        gt = gts.get(f"{group}/{_stem(name)}" if group else _stem(name))
        spec.images.append(ImageSpec(fs.unstrip_protocol(p), fs.unstrip_protocol(gt) if gt else None, name))
    return finish(list(groups.values()))


# key -> bytes; sizes differ so that image_bytes is checked against the files
TREE = {
    "image/cat/a.jpg": b"aaa", "image/cat/b.jpg": b"bbbbb", "image/cat/.DS_Store": b"x",
    "image/cat/sub/c.jpg": b"cc", "image/dog/a.jpg": b"1", "image/dog/a.png": b"12",
    "image/dog/x y ü.jpg": b"123", "image/a..b/x.jpg": b"1234", "image/top.jpg": b"12345",
    "groundtruth/cat/a.jpg": b"m", "groundtruth/cat/a.png": b"m", "groundtruth/cat/sub/c.png": b"m",
    "groundtruth/cat/.b.png": b"m", "groundtruth/dog/a.png": b"m", "groundtruth/top.png": b"m",
}
S3_ONLY = {"image/../d.jpg": b"dd", "image/back\\slash/e.jpg": b"e"}  # names a local disk cannot hold


def local_tree(root):
    for key, data in TREE.items():
        touch(root / key, data)
    (root / "image/empty").mkdir()
    return str(root)


@pytest.fixture(scope="module")
def s3_tree(s3_server):
    fs = make_bucket(s3_server, "listing")
    for key, data in {**TREE, **S3_ONLY}.items():
        fs.pipe_file(f"listing/root/{key}", data)
    fs.pipe_file("listing/root/image/empty/", b"")  # an empty group: a folder marker only
    fs.pipe_file("listing/root/image/", b"")  # a marker for image/ itself is not an input
    return "s3://listing/root", {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing", "secret": "testing"}


def as_rows(groups):
    return sorted((group_row(g) for g in groups), key=lambda r: r["group"])


def without_sizes(rows):
    return [{k: v for k, v in r.items() if k != "image_bytes"} for r in rows]


def test_parallel_listing_matches_the_sequential_walk_on_disk(tmp_path):
    root = local_tree(tmp_path)
    reference = sequential_listing(Storage(root))
    groups = list_layout(Storage(root))
    assert without_sizes(as_rows(groups)) == without_sizes(as_rows(reference))
    assert {g.group for g in groups} == {"", "a..b", "cat", "dog", "empty"}
    assert {im.image_uri: im.size for g in groups for im in g.images} == image_sizes(f"file://{tmp_path}", TREE)


def image_sizes(root_url, tree):
    """image URL -> size for the inputs of a tree (hidden files are not inputs)."""
    return {f"{root_url}/{k}": len(v) for k, v in tree.items()
            if k.startswith("image/") and not posixpath.basename(k).startswith(".")}


def test_parallel_listing_matches_the_sequential_walk_on_s3(s3_tree):
    url, opts = s3_tree
    reference = sequential_listing(Storage(url, opts))
    groups = list_layout(Storage(url, opts))
    assert without_sizes(as_rows(groups)) == without_sizes(as_rows(reference))
    assert {"..", "back\\slash", "empty", ""} <= {g.group for g in groups}
    assert next(g for g in groups if g.group == "empty").images == []
    assert {im.image_uri: im.size for g in groups for im in g.images} == image_sizes(url, {**TREE, **S3_ONLY})
    # the listing filesystem keeps no listings cache (s3fs would otherwise hold every entry it listed)
    fs = _listing_fs(url, opts)[0]
    assert fs.dircache.use_listings_cache is False and len(fs.dircache) == 0


def dataset_rows(ray, ds):
    rows = [row for table in ray.get(ds.to_arrow_refs()) for row in table.to_pylist()]
    return sorted(rows, key=lambda r: r["group"])


def test_group_dataset_lists_in_ray_tasks_and_summarizes(ray_local, tmp_path, s3_tree):
    ray = ray_local
    url, opts = s3_tree
    local = local_tree(tmp_path)
    for spec, tree in ((InputSpec(input=local), TREE), (InputSpec(input=url, storage_options=opts), {**TREE, **S3_ONLY})):
        reference = sequential_listing(Storage(spec.input, spec.storage_options))
        ds = group_dataset(spec).materialize()
        rows = dataset_rows(ray, ds)
        assert without_sizes(rows) == without_sizes(as_rows(reference))
        assert rows == as_rows(list_layout(Storage(spec.input, spec.storage_options)))  # sizes too

        summary = summarize(ds, first=3)
        sizes = sorted(len(g.images) for g in reference)
        assert summary["groups"] == len(reference)
        assert summary["images"] == sum(sizes)
        assert summary["images_with_gt"] == sum(im.gt_uri is not None for g in reference for im in g.images)
        assert summary["bytes"] == sum(image_sizes("", tree).values())
        assert summary["images_of_unknown_size"] == 0
        assert summary["empty_groups"] == {"count": 1, "first": ["empty"]}
        assert summary["largest_group"] == {"group": "cat", "images": 3}  # cat and dog hold 3: ties go by name
        assert summary["group_size_percentiles"]["min"] == sizes[0]
        assert summary["group_size_percentiles"]["max"] == sizes[-1]
        assert sizes[0] <= summary["group_size_percentiles"]["p50"] <= summary["group_size_percentiles"]["p90"]


def test_extensions_leave_sidecar_files_out_of_the_listing(ray_local, tmp_path, s3_tree):
    """With extensions, only files with them are images (case ignored), in every group and at the root, on a local
    disk and in the S3 range listing alike; without, every file is (as the other tests list)."""
    from pipeline.listing import normal_extensions

    assert normal_extensions(" JPG,.png,,") == ("jpg", "png") and normal_extensions([".Webp,GIF"]) == ("gif", "webp")
    with pytest.raises(ValueError, match="what follows its last dot"):
        normal_extensions("tar.gz")
    for nothing in (" , ", [".", ""], ()):
        with pytest.raises(ValueError, match="name no file extension"):
            normal_extensions(nothing)
    for name in ("a.jpg", "a.json", "a.txt", "B.JPG", "c.png"):  # img2dataset writes .json and .txt beside
        touch(tmp_path / "g" / name)
    touch(tmp_path / "h" / "x.json")
    (group, empty) = list_layout(Storage(str(tmp_path)), extensions=(".JPG",))  # normalised where it is used
    assert [im.name for im in group.images] == ["B.JPG", "a.jpg"] and empty.group == "h" and empty.images == []
    assert [len(g.images) for g in list_layout(Storage(str(tmp_path)))] == [5, 1]
    url, opts = s3_tree
    rows = dataset_rows(ray_local, group_dataset(InputSpec(input=url, storage_options=opts, extensions=("png",))))
    names = sorted(posixpath.basename(u) for r in rows for u in r["image_uris"])
    assert names == ["a.png"]  # image/dog/a.png
    # every group folder stays a group; no root group: image/top.jpg is not a png
    assert {r["group"] for r in rows} == {"cat", "dog", "a..b", "empty", "..", "back\\slash"}


# --- manifests: Parquet, CSV, gzip by content, relative URIs, the same rows on the driver and in Ray ---------

MANIFEST = pd.DataFrame({
    "group": ["g", "g", "01", "NA", "g"],
    "image_uri": ["data/b.jpg", "data/a.jpg", "data/c.jpg", "/abs/d.jpg", "data/a.jpg"],
    "gt_uri": ["", "gt/a.png", None, "s3://bkt/d.png", ""],
})


def write_manifest(tmp_path, name):
    path = tmp_path / name
    if name.endswith(".parquet"):
        MANIFEST.to_parquet(path)
    else:
        text = MANIFEST.to_csv(index=False).encode()
        path.write_bytes(gzip.compress(text) if name.endswith(".gz") or name == "zipped-but-named.csv" else text)
    return str(path)


@pytest.mark.parametrize("name", ["m.parquet", "m.csv", "m.csv.gz", "zipped-but-named.csv"])
def test_manifest_formats_on_the_driver(tmp_path, name):
    groups = {g.group: g for g in list_manifest(write_manifest(tmp_path, name), {})}
    assert sorted(groups) == ["01", "NA", "g"]  # group names are text: "01" and "NA" are kept as written
    g = groups["g"].images
    assert [im.image_uri for im in g] == [f"file://{tmp_path}/data/{n}" for n in ("a.jpg", "a.jpg", "b.jpg")]
    assert [im.name for im in g] == ["a.jpg", "a.jpg", "b.jpg"]
    assert len({im.mask_key for im in g}) == 3  # the same file listed twice still gets two outputs
    assert sum(im.gt_uri is not None for im in g) == 1
    assert groups["NA"].images[0].image_uri == "/abs/d.jpg"
    assert groups["NA"].images[0].gt_uri == "s3://bkt/d.png"
    assert groups["01"].images[0].gt_uri is None and groups["01"].images[0].size == -1


def test_manifest_dataset_matches_the_driver(ray_local, tmp_path):
    # Parquet here; a gzip-compressed CSV goes through the same Ray path in test_infer's manifest test
    url = write_manifest(tmp_path, "m.parquet")
    assert dataset_rows(ray_local, group_dataset(InputSpec(manifest=url))) == as_rows(list_manifest(url, {}))


@pytest.mark.parametrize("name, data, match", [
    ("m.csv.gz", b"group,image_uri\ng,a.jpg\n", "named .gz but is not gzip"),
    ("m.parquet", b"group,image_uri\ng,a.jpg\n", "not a Parquet file"),
    ("m.csv", b"group,image_uri\n", "has no rows"),
    ("m.csv", gzip.compress(b"image\na.jpg\n"), "missing column"),
    ("m.csv", b'group,image_uri\n"g,a.jpg\n', "cannot be read as CSV"),
])
def test_bad_manifests_fail_before_any_work(tmp_path, name, data, match):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match=match):
        check_input(InputSpec(manifest=str(tmp_path / name)))


# --- inputs that would be misread ----------------------------------------------------------------------------

def test_ambiguous_roots_are_errors_unless_the_layout_is_given(tmp_path):
    touch(tmp_path / "img/cat/a.jpg")
    touch(tmp_path / "GT/cat/a.png")
    with pytest.raises(ValueError, match=r"no image/ folder but has GT/, img/.*--layout groups"):
        check_input(InputSpec(input=str(tmp_path)))
    with pytest.raises(ValueError, match="--layout cosod needs"):
        check_input(InputSpec(input=str(tmp_path), layout="cosod"))
    groups = list_layout(Storage(str(tmp_path)), layout="groups")
    assert [(g.group, [im.name for im in g.images]) for g in groups] == [("GT", ["cat/a.png"]), ("img", ["cat/a.jpg"])]

    touch(tmp_path / "image/cat/a.jpg")  # image/ with ground truth in a folder that is not groundtruth/
    with pytest.raises(ValueError, match="has image/ and GT/ but no groundtruth/"):
        check_input(InputSpec(input=str(tmp_path)))
    (cat,) = list_layout(Storage(str(tmp_path)), layout="cosod")
    assert cat.group == "cat" and cat.images[0].gt_uri is None


def test_input_errors_are_clear_and_redacted(tmp_path):
    with pytest.raises(ValueError, match="give --input"):
        check_input(InputSpec())
    with pytest.raises(ValueError, match="not both"):
        check_input(InputSpec(input=str(tmp_path), manifest=str(tmp_path / "m.csv")))
    with pytest.raises(ValueError, match="layout 'cosd'"):
        check_input(InputSpec(input=str(tmp_path), layout="cosd"))
    with pytest.raises(ValueError, match="holds no images"):
        check_input(InputSpec(input=str(tmp_path)))
    touch(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="is a file"):
        check_input(InputSpec(input=str(tmp_path / "a.jpg")))
    with pytest.raises(FileNotFoundError) as err:
        check_input(InputSpec(input=f"file://{tmp_path}/missing?X-Amz-Signature=s3cr3t"))
    assert "s3cr3t" not in str(err.value) and "missing" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        check_input(InputSpec(manifest=f"file://{tmp_path}/m.csv?X-Amz-Signature=s3cr3t"))
    assert "s3cr3t" not in str(err.value)


def test_one_group_is_listed_alone(tmp_path):
    roots, names = resolve_layout(InputSpec(input=local_tree(tmp_path)))
    assert names == ["", "a..b", "cat", "dog", "empty"]  # "" holds the files directly in image/
    cat = list_group(roots.fs(), roots, "cat")
    assert [(im.name, im.size, (im.gt_uri or "").rsplit("/", 1)[-1]) for im in cat.images] == [
        ("a.jpg", 3, "a.png"), ("b.jpg", 5, ""), ("sub/c.jpg", 2, "c.png")]  # of a.jpg and a.png, the PNG


# --- S3: runs of neighbouring groups listed as ranges of keys -------------------------------------------------

# Group names whose keys interleave ("a-b/x" < "a.b/x" < "a/x" < "a0.jpg" < "ab/x"), files directly in image/
# between them, a nested folder, an empty group (a marker only) and ground truth for some.
RANGE_TREE = {
    "image/a/1.jpg": b"1", "image/a/sub/2.jpg": b"22", "image/a-b/1.jpg": b"333", "image/a.b/1.jpg": b"4",
    "image/a0.jpg": b"55", "image/ab/1.jpg": b"6", "image/ab/2.jpg": b"77", "image/a b/1.jpg": b"8",
    "image/b/1.jpg": b"9", "image/b0/1.jpg": b"10", "image/c/1.jpg": b"11", "image/c/.hidden": b"x",
    "groundtruth/a/1.png": b"m", "groundtruth/a-b/1.png": b"m", "groundtruth/a0.png": b"m", "groundtruth/ab/2.png": b"m",
    "groundtruth/c/1.png": b"m",
}


@pytest.fixture
def list_calls(monkeypatch):
    """Counts the ListObjectsV2 requests s3fs sends from this process."""
    import s3fs

    calls = []
    original, original_sync = s3fs.S3FileSystem._call_s3, s3fs.S3FileSystem.call_s3

    async def counting(self, method, *args, **kwargs):
        if method == "list_objects_v2":
            calls.append(kwargs.get("Prefix"))
        return await original(self, method, *args, **kwargs)

    def counting_sync(self, method, *args, **kwargs):  # s3fs's sync call_s3 wraps the original coroutine
        if method == "list_objects_v2":
            calls.append(kwargs.get("Prefix"))
        return original_sync(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counting)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", counting_sync)
    return calls


@pytest.mark.parametrize("page_keys", [1000, 2])  # 2: every walk goes on over several pages
def test_range_listing_on_s3_matches_the_walk_and_sends_fewer_requests(s3_server, monkeypatch, list_calls, page_keys):
    import pipeline.listing as listing

    fs = make_bucket(s3_server, f"ranges{page_keys}")
    for key, data in RANGE_TREE.items():
        fs.pipe_file(f"ranges{page_keys}/r/{key}", data)
    fs.pipe_file(f"ranges{page_keys}/r/image/empty/", b"")
    url, opts = f"s3://ranges{page_keys}/r", {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing",
                                              "secret": "testing"}
    reference = as_rows(sequential_listing(Storage(url, opts)))
    roots, names = resolve_layout(InputSpec(input=url, storage_options=opts))
    monkeypatch.setattr(listing, "LIST_PAGE_KEYS", page_keys)
    monkeypatch.setattr(listing, "GROUPS_PER_RUN", 3)

    groups = list_layout(Storage(url, opts))
    assert as_rows(groups) == as_rows(listing.finish([list_group(roots.fs(), roots, g) for g in names]))  # sizes too
    assert without_sizes(as_rows(groups)) == without_sizes(reference)
    assert {g.group for g in groups} == {"", "a", "a-b", "a.b", "ab", "a b", "b", "b0", "c", "empty"}
    # nine groups in three runs, each one walk of image/ and one of groundtruth/, plus the root's own files (one
    # listing each of image/ and groundtruth/); per group it would be 18 + 2
    list_calls.clear()
    assert as_rows(listing.finish(listing._list_groups(roots.fs(), roots, names))) == as_rows(groups)
    if page_keys == 1000:
        assert len(list_calls) == 3 * 2 + 2, list_calls

    # a task's groups with a gap between them (another task's groups) are listed as two runs, not one walk
    # over the others, even where a run could hold all four
    monkeypatch.setattr(listing, "GROUPS_PER_RUN", 4)
    list_calls.clear()
    ranked = sorted(names, key=listing._key_order)
    picked = [2, 3, 7, 8]
    specs = listing._list_groups(roots.fs(), roots, [ranked[i] for i in picked], picked)
    assert as_rows(listing.finish(specs)) == [r for r in as_rows(groups) if r["group"] in {ranked[i] for i in picked}]
    if page_keys == 1000:
        assert len(list_calls) == 2 * 2, list_calls


def test_key_runs_follow_key_order_and_end_at_gaps():
    from pipeline.listing import key_runs

    names = ["a", "a-b", "a.b", "ab", "b", "c"]  # key order: a-b/, a.b/, a/, ab/, b/, c/
    assert key_runs(names, None, 3) == [["a-b", "a.b", "a"], ["ab", "b", "c"]]
    assert key_runs(names, None, 4) == [["a-b", "a.b", "a", "ab"], ["b", "c"]]
    assert key_runs(names, None, 1) == [[n] for n in ["a-b", "a.b", "a", "ab", "b", "c"]]
    assert key_runs(["x", "y", "z", "w"], [0, 1, 5, 6], 8) == [["x", "y"], ["z", "w"]]


def test_a_store_that_lists_out_of_order_falls_back_to_each_group(s3_server, monkeypatch):
    """The walk stops at the first key past its run, which is only sound where keys come in order: S3 Express
    directory buckets (by name) are listed group by group, and a walk that meets keys out of order gives up
    for the per-group listing rather than lose images."""
    import s3fs

    import pipeline.listing as listing

    fs = make_bucket(s3_server, "unordered")
    for key, data in RANGE_TREE.items():
        fs.pipe_file(f"unordered/r/{key}", data)
    url, opts = "s3://unordered/r", {"client_kwargs": {"endpoint_url": s3_server}, "key": "testing",
                                     "secret": "testing"}
    roots, names = resolve_layout(InputSpec(input=url, storage_options=opts))
    expected = as_rows(listing.finish([list_group(roots.fs(), roots, g) for g in names]))
    call_s3 = s3fs.S3FileSystem.call_s3

    def reversed_pages(self, method, *args, **kwargs):
        page = call_s3(self, method, *args, **kwargs)
        if method == "list_objects_v2" and "StartAfter" in kwargs:
            page = {**page, "Contents": page.get("Contents", [])[::-1]}
        return page

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", reversed_pages)
    monkeypatch.setattr(listing, "GROUPS_PER_RUN", 3)  # runs that end before their page does
    assert as_rows(listing.finish(listing._list_groups(roots.fs(), roots, names))) == expected
    assert not listing._s3_range_listing(roots.fs(), "data--use1-az4--x-s3/r/image")
    assert listing._s3_range_listing(roots.fs(), roots.image_root)
