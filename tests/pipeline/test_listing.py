import pandas as pd
import pytest

from pipeline.listing import list_layout, list_manifest
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
