"""Offline evaluation: values against pysodmetrics, exact streaming aggregation over runs and maps, the gallery's
sources, the CLI, and the comparison report in a browser."""
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import warnings
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import pipeline.evaluate as ev
from conftest import TINY_VIT
from jobs.evaluate import main as evaluate_main
from jobs.evaluate import labelled, parse_args
from pipeline.evaluate import Source, evaluate
from pipeline.report import gallery, render
from pipeline.sample import synthetic_group
from scosparc_core.metrics import CURVE_POINTS, CURVES, SCALARS, aggregate, image_metrics

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from py_sod_metrics import MAE, Emeasure, Fmeasure, Smeasure, WeightedFmeasure

FIGURES = ("max_fm", "mean_fm", "adp_fm", "sm", "max_em", "mean_em", "adp_em", "mae", "wfm")


def noisy_map(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible soft prediction: the ground truth blurred, shifted and with noise."""
    soft = np.roll(gt.astype(np.float32), rng.integers(-12, 12, size=2), axis=(0, 1))
    soft = soft * rng.uniform(0.5, 1.0) + rng.normal(0, 35, size=gt.shape)
    return np.clip(soft, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Two methods' maps, the ground truth and the photos (CoSOD layout: image/ beside gt/), for 2 groups of
    synthetic images (exact masks); m1 lacks one map."""
    root = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(3)
    for kind, n in (("horse", 4), ("disc", 3)):
        for i, (rgb, gt) in enumerate(synthetic_group(kind, n)):
            for sub, array in (("gt", gt), ("m1", noisy_map(gt, rng)), ("m2", noisy_map(gt, rng)), ("image", rgb)):
                (root / sub / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / sub / kind / f"{kind}_{i:03d}.{'jpg' if sub == 'image' else 'png'}")
    (root / "m1" / "disc" / "disc_002.png").unlink()
    return root


def pysodmetrics_figures(pairs) -> dict:
    """The dataset figures of pysodmetrics itself, stepped over (pred, gt) uint8 arrays."""
    fm, em, sm, wfm, mae = Fmeasure(), Emeasure(), Smeasure(), WeightedFmeasure(), MAE()
    for pred, gt in pairs:
        for m in (fm, em, sm, wfm, mae):
            m.step(pred=pred, gt=gt)
    f, e = fm.get_results(), em.get_results()
    return {"max_fm": f["fm"]["curve"].max(), "mean_fm": f["fm"]["curve"].mean(), "adp_fm": f["fm"]["adp"],
            "max_em": e["em"]["curve"].max(), "mean_em": e["em"]["curve"].mean(), "adp_em": e["em"]["adp"],
            "sm": sm.get_results()["sm"], "wfm": wfm.get_results()["wfm"], "mae": mae.get_results()["mae"],
            "precision": f["pr"]["p"], "recall": f["pr"]["r"]}


def cv2_gray(path: Path) -> np.ndarray:
    """A map or mask read as pysodmetrics' users read them."""
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)


def test_values_equal_pysodmetrics_one_pass(maps):
    metrics, details = evaluate([Source("m2", maps=str(maps / "m2"), gt=str(maps / "gt"), dataset="toy")])
    ours = metrics[metrics["scope"] == "dataset"].iloc[0]
    expected = pysodmetrics_figures((cv2_gray(maps / "m2" / p.relative_to(maps / "gt")), cv2_gray(p))
                                    for p in sorted((maps / "gt").rglob("*.png")))
    for key in FIGURES:
        assert ours[key] == pytest.approx(expected[key], abs=1e-12, rel=0), key
    np.testing.assert_allclose(ours["precision"], expected["precision"], atol=1e-12)
    np.testing.assert_allclose(ours["recall"], expected["recall"], atol=1e-12)
    assert ours["images"] == 7 and ours["missing_predictions"] == 0


def test_16_bit_and_colour_maps_are_scored_as_cv2_reads_them(tmp_path):
    """A 16-bit map is scaled to 8 bits (PIL's convert("L") clipped it at 255: a near-binary map), a colour one
    goes through OpenCV's gray conversion; both as cv2.imread(..., IMREAD_GRAYSCALE) gives them to pysodmetrics."""
    rng = np.random.default_rng(5)
    for i, (_, gt) in enumerate(synthetic_group("horse", 2)):
        soft = noisy_map(gt, rng)
        wide = soft.astype(np.uint16) * 256 + rng.integers(0, 256, gt.shape, dtype=np.uint16)  # all 16 bits used
        colour = np.stack([soft, np.roll(soft, 7, axis=0), 255 - soft], axis=-1)
        for group, pred in (("wide", wide), ("colour", colour)):
            for sub, array in (("gt", gt), ("m", pred)):
                (tmp_path / sub / group).mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(tmp_path / sub / group / f"{i}.png"), array)
    assert Image.open(tmp_path / "m" / "wide" / "0.png").mode.startswith("I;16")
    metrics, _ = evaluate([Source("m", maps=str(tmp_path / "m"), gt=str(tmp_path / "gt"))])
    groups = metrics[metrics["scope"] == "group"].set_index("group")
    for group in ("wide", "colour"):
        expected = pysodmetrics_figures((cv2_gray(p), cv2_gray(tmp_path / "gt" / group / p.name))
                                        for p in sorted((tmp_path / "m" / group).glob("*.png")))
        for key in FIGURES:
            assert groups.loc[group, key] == pytest.approx(expected[key], abs=1e-12, rel=0), (group, key)


def test_maps_that_opencv_cannot_decode_are_read_through_pil_the_same_way(tmp_path, monkeypatch):
    wide = np.random.default_rng(1).integers(0, 65536, (20, 30), dtype=np.uint16)
    assert cv2.imwrite(str(tmp_path / "wide.png"), wide)
    data = (tmp_path / "wide.png").read_bytes()
    monkeypatch.setattr(ev.cv2, "imdecode", lambda *a: None)
    assert np.array_equal(ev.read_map(data), cv2_gray(tmp_path / "wide.png"))


def test_maps_stream_equals_aggregate_of_every_image(maps):
    metrics, details = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"))])
    rows = []
    for gt_path in sorted((maps / "gt").rglob("*.png")):
        pred_path = maps / "m1" / gt_path.relative_to(maps / "gt")
        if pred_path.exists():
            m = image_metrics(np.asarray(Image.open(pred_path)), np.asarray(Image.open(gt_path)))
            rows.append({**m, "group": gt_path.parent.name})
    table = metrics.set_index(["scope", "group"], drop=False)
    whole = aggregate(rows[::-1])
    dataset = metrics[metrics["scope"] == "dataset"].iloc[0]
    for key in FIGURES:
        assert dataset[key] == whole[key], key  # bit for bit, not approximately
    assert dataset["images"] == 6 and dataset["missing_predictions"] == 1
    for group in ("horse", "disc"):
        part = aggregate([r for r in rows if r["group"] == group])
        for key in FIGURES:
            assert table.loc[("group", group), key] == part[key], (group, key)


def test_every_group_gets_a_row_with_its_counts(tmp_path):
    """Groups without a scored image (maps missing, a map that does not decode) keep a row: images 0, figures
    NaN, their counts as integers; files that are not images (Thumbs.db, README.txt) are nobody's images."""
    _, gt = synthetic_group("disc", 1)[0]
    soft = noisy_map(gt, np.random.default_rng(7))
    for sub, group, name, data in (("gt", "full", "a.png", _png(gt)), ("m", "full", "a.png", _png(soft)),
                                   ("gt", "full", "Thumbs.db", b"\0" * 16), ("m", "full", "README.txt", b"maps"),
                                   ("gt", "nomaps", "a.png", _png(gt)), ("gt", "nomaps", "b.png", _png(gt)),
                                   ("gt", "broken", "a.png", _png(gt)), ("m", "broken", "a.png", b"not a png")):
        (tmp_path / sub / group).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / group / name).write_bytes(data)
    metrics, details = evaluate([Source("m", maps=str(tmp_path / "m"), gt=str(tmp_path / "gt"))])
    rows = metrics.set_index(["scope", "group"], drop=False)
    counts = ["images", "errors", "missing_predictions", "images_without_metrics"]
    assert rows.loc[("group", "full"), counts].tolist() == [1, 0, 0, 0]
    assert rows.loc[("group", "nomaps"), counts].tolist() == [0, 0, 2, 0]
    assert rows.loc[("group", "broken"), counts].tolist() == [0, 1, 0, 1]
    dataset = metrics[metrics["scope"] == "dataset"].iloc[0]
    assert dataset[counts].tolist() == [1, 1, 2, 1]
    assert all(metrics[k].dtype == np.int64 for k in counts), metrics[counts].dtypes
    for group in ("nomaps", "broken"):
        assert rows.loc[("group", group), list(FIGURES)].isna().all()
    expected = pysodmetrics_figures([(soft, gt)])
    for key in FIGURES:
        assert rows.loc[("group", "full"), key] == pytest.approx(expected[key], abs=1e-12, rel=0), key
    page = render(metrics, details)
    assert "3 groups" in page and "2 not ranked (no scored image for it)" in page


def test_maps_and_ground_truth_of_one_stem_prefer_the_png(tmp_path):
    """As the inference listing does for ground truth: of a.png and a.jpg the PNG is the mask (and the map)."""
    (_, gt), (_, other) = synthetic_group("horse", 2)
    soft = noisy_map(gt, np.random.default_rng(2))
    for sub, array in (("gt", gt), ("m", soft)):
        (tmp_path / sub / "g").mkdir(parents=True)
        Image.fromarray(array).save(tmp_path / sub / "g" / "a.png")
        Image.fromarray(255 - other).save(tmp_path / sub / "g" / "a.jpg")  # sorts first, differs
    metrics, _ = evaluate([Source("m", maps=str(tmp_path / "m"), gt=str(tmp_path / "gt"))])
    ours = metrics[metrics["scope"] == "dataset"].iloc[0]
    expected = pysodmetrics_figures([(soft, gt)])
    assert ours["images"] == 1
    for key in FIGURES:
        assert ours[key] == pytest.approx(expected[key], abs=1e-12, rel=0), key


def test_ray_data_scoring_equals_local(ray_local, maps):
    local, _ = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"))])
    on_ray, _ = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"))], use_ray=True)
    cols = ["images", "missing_predictions", *FIGURES]
    key = ["scope", "group"]
    a = local.sort_values(key, na_position="first")[cols].to_numpy(float)
    b = on_ray.sort_values(key, na_position="first")[cols].to_numpy(float)
    assert np.array_equal(a, b, equal_nan=True)


def test_maps_gallery_takes_photos_beside_gt_or_from_images(maps, tmp_path):
    _, details = evaluate([Source("m2", maps=str(maps / "m2"), gt=str(maps / "gt"))], gallery=2)
    picks = details["m2"]["gallery"]
    assert len(picks["worst"]) == 2 and len(picks["best"]) == 2
    for r in picks["worst"] + picks["best"]:
        assert r["image_uri"].endswith(f"/image/{r['group']}/{r['name']}.jpg")
    assert max(r["sm"] for r in picks["worst"]) <= min(r["sm"] for r in picks["best"])
    page = gallery(picks, {})
    assert page.count("<figure>") == 4 and page.count("<img") == 12  # photo, ground truth, prediction
    photos = tmp_path / "photos"
    shutil.copytree(maps / "image", photos)
    (photos / "horse").rename(photos / "elsewhere")  # not found there: no photo, still a figure
    _, details = evaluate([Source("m2", maps=str(maps / "m2"), gt=str(maps / "gt"), images=str(photos))])
    uris = [r["image_uri"] for side in details["m2"]["gallery"].values() for r in side]
    assert {u is None for u in uris} == {True, False}
    assert all(str(photos) in u for u in uris if u)


# ---- runs: synthetic predictions Parquet --------------------------------------------------------------------

def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG")
    return buf.getvalue()


def write_run(root: Path, rng: np.random.Generator, layout: str = "parts", mask_png: bool = True) -> pd.DataFrame:
    """A run's predictions/ with 9 groups of 7-12 images, error rows (null metrics), a group with errors only,
    rows without ground truth, and curves whose float sums depend on the order. Layouts: ``parts``, a file per
    part of a group (1-3 parts); ``shards``, whole-block shards of ~8 rows, groups in order but the files named
    by digest (jobs/infer.py's sink); ``interleaved``, the rows shuffled over 3 files. Returns the rows."""
    records = []
    for g in range(9):
        group = f"g{g:02d}"
        for i in range(int(rng.integers(7, 13))):
            status = "error" if (g == 4 or rng.random() < 0.1) else "ok"
            has = status == "ok" and rng.random() > 0.05
            rec = {"group": group, "name": f"{group}_{i:03d}", "status": status, "image_uri": None,
                   "gt_uri": None, "mask_uri": None, "mask_png": _png(np.full((8, 8), i * 20, np.uint8))}
            for k in SCALARS:
                rec[k] = float(rng.random() * 10.0 ** -rng.integers(0, 9)) if has else None
            for k in CURVES:
                curve = rng.random(CURVE_POINTS) * 10.0 ** -rng.integers(0, 12, CURVE_POINTS)
                rec[k] = curve.tolist() if has else None
            records.append(rec)
    frame = pd.DataFrame(records)
    schema = pa.schema([("group", pa.string()), ("name", pa.string()), ("status", pa.string()),
                        ("image_uri", pa.string()), ("gt_uri", pa.string()), ("mask_uri", pa.string()),
                        ("mask_png", pa.binary()), *[(k, pa.float64()) for k in SCALARS],
                        *[(k, pa.list_(pa.float64(), CURVE_POINTS)) for k in CURVES]])
    if not mask_png:
        schema = schema.remove(schema.get_field_index("mask_png"))
    out = root / "predictions"
    out.mkdir(parents=True)

    def write(rows: pd.DataFrame, name: str) -> None:
        pq.write_table(pa.Table.from_pandas(rows, schema=schema, preserve_index=False), out / name)

    if layout == "parts":
        for group, rows in frame.groupby("group"):
            parts = np.array_split(np.arange(len(rows)), int(rng.integers(1, 4)))
            for p, idx in enumerate(parts):
                write(rows.iloc[idx], f"part-{group}-{p:05d}-of-{len(parts):05d}.parquet")
    else:
        order = rng.permutation(len(frame)) if layout == "interleaved" else np.arange(len(frame))
        for j, idx in enumerate(np.array_split(order, 3 if layout == "interleaved" else len(frame) // 8)):
            write(frame.iloc[idx], f"part-r0001-{hashlib.sha1(str(j).encode()).hexdigest()[:8]}.parquet")
    return frame


def expected_figures(frame: pd.DataFrame) -> tuple[dict, dict]:
    usable = frame[frame["mae"].notna()].sample(frac=1.0, random_state=5)  # another order
    whole = aggregate(usable.to_dict("records"))
    groups = {g: aggregate(part.to_dict("records")) for g, part in usable.groupby("group")}
    return whole, groups


@pytest.fixture
def small_flushes(monkeypatch):
    """Batches and flushes smaller than a group, so that groups span batches, flushes and files."""
    monkeypatch.setattr(ev, "BATCH_ROWS", 5)
    monkeypatch.setattr(ev, "FLUSH_ROWS", 7)
    monkeypatch.setattr(ev, "MAX_OPEN_GROUPS", 4)


def test_run_stream_equals_aggregate_of_all_rows_in_any_layout(tmp_path, small_flushes):
    open_groups = {}
    for layout in ("parts", "shards", "interleaved"):
        frame = write_run(tmp_path / layout, np.random.default_rng(11), layout)
        whole, groups = expected_figures(frame)
        metrics, details = evaluate([Source(layout, run=str(tmp_path / layout), dataset="toy")])
        dataset = metrics[metrics["scope"] == "dataset"].iloc[0]
        for key in FIGURES:
            assert dataset[key] == whole[key], (layout, key)
        for key in CURVES:
            assert np.array_equal(dataset[key], whole[key]), (layout, key)
        assert dataset["images"] == whole["images"]
        assert dataset["images_without_metrics"] == len(frame) - whole["images"]
        assert dataset["errors"] == (frame["status"] == "error").sum() > 0
        per_group = metrics[metrics["scope"] == "group"].set_index("group")
        assert sorted(per_group.index) == sorted(frame["group"].unique())  # g04 has errors only: a row too
        assert set(groups) == set(per_group.index) - {"g04"}
        for g, expected in groups.items():
            for key in FIGURES:
                assert per_group.loc[g, key] == expected[key], (layout, g, key)
            assert per_group.loc[g, "images"] == expected["images"]
        assert per_group.loc["g04", "images"] == 0 and per_group.loc["g04", list(FIGURES)].isna().all()
        for g, rows in frame.groupby("group"):
            assert per_group.loc[g, "errors"] == (rows["status"] == "error").sum(), (layout, g)
            assert per_group.loc[g, "images_without_metrics"] == rows["mae"].isna().sum(), (layout, g)
            assert per_group.loc[g, "missing_predictions"] == 0
        assert per_group[["images", "errors", "images_without_metrics"]].dtypes.eq(np.int64).all()
        open_groups[layout] = (details[layout]["most_open_groups"], details[layout]["passes"])
    # a run's parts, or shards read in the order of their groups, keep about one group open between flushes;
    # rows scattered over every file would keep most groups open until the last file: past the limit (4 here)
    # the run is read in passes by group hash, with the same numbers
    assert open_groups["parts"][0] <= 2 and open_groups["shards"][0] <= 2, open_groups
    assert open_groups["parts"][1] == open_groups["shards"][1] == 1 and open_groups["interleaved"][1] > 1, open_groups


def test_run_gallery_is_the_best_and_worst_rows(tmp_path, small_flushes):
    frame = write_run(tmp_path / "run", np.random.default_rng(2))
    _, details = evaluate([Source("r", run=str(tmp_path / "run"))], gallery=3)
    scored = frame[frame["mae"].notna()].sort_values("sm")
    picks = details["r"]["gallery"]
    assert [r["name"] for r in picks["worst"]] == scored["name"].head(3).tolist()
    assert [r["name"] for r in picks["best"]] == scored["name"].tail(3).tolist()[::-1]
    by_name = frame.set_index("name")
    for r in picks["worst"] + picks["best"]:
        assert r["sm"] == by_name.loc[r["name"], "sm"] and r["mask_png"] == by_name.loc[r["name"], "mask_png"]


def test_gallery_reads_masks_from_parquet_tar_member_or_png(tmp_path):
    _, gt = synthetic_group("disc", 1)[0]
    gt_path = tmp_path / "gt.png"
    Image.fromarray(gt).save(gt_path)
    png = _png(np.roll(gt, 9, axis=1))
    (tmp_path / "mask.png").write_bytes(png)
    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        for name, data in (("other.png", _png(np.zeros((4, 4), np.uint8))), ("disc/disc_000.png", png)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    base = {"group": "disc", "name": "disc_000", "gt_uri": str(gt_path), "image_uri": None, "sm": 0.5, "mae": 0.1}
    rows = [{**base, "mask_png": png, "mask_uri": str(tmp_path / "not-there.png")},
            {**base, "mask_uri": f"{tmp_path / 'shard-00000.tar'}#disc/disc_000.png"},
            {**base, "mask_uri": str(tmp_path / "mask.png")},
            {**base, "mask_uri": f"{tmp_path / 'shard-00000.tar'}#disc/missing.png"}]
    page = gallery({"worst": rows, "best": []}, {})
    images = [part.split('"')[0] for part in page.split('src="')[1:]]
    assert page.count("<figure>") == 3 and len(images) == 6  # the missing tar member is left out
    assert images[1] == images[3] == images[5]  # the same prediction, read three ways


def test_gallery_shows_a_16_bit_map_as_it_was_scored(tmp_path):
    _, gt = synthetic_group("disc", 1)[0]
    (tmp_path / "gt.png").write_bytes(_png(gt))
    soft = noisy_map(gt, np.random.default_rng(6))
    wide = soft.astype(np.uint16) * 256 + 255  # >> 8 is soft; PIL's convert("L") clipped it to 255 nearly everywhere
    base = {"group": "disc", "name": "disc_000", "gt_uri": str(tmp_path / "gt.png"), "image_uri": None, "sm": 0.5,
            "mae": 0.1}
    pages = [gallery({"worst": [{**base, "mask_png": cv2.imencode(".png", pred)[1].tobytes()}], "best": []}, {})
             for pred in (wide, soft)]
    images = [[part.split('"')[0] for part in page.split('src="')[1:]] for page in pages]
    assert len(images[0]) == len(images[1]) == 2 and images[0] == images[1]


def test_report_lists_top_and_bottom_groups(tmp_path):
    rng = np.random.default_rng(4)
    write_run(tmp_path / "run", rng)
    metrics, details = evaluate([Source("r", run=str(tmp_path / "run"), dataset="toy")])
    groups = metrics[metrics["scope"] == "group"]
    ranked = groups[groups["max_fm"].notna()].sort_values("max_fm", ascending=False)["group"]  # g04: errors only
    page = render(metrics, details, top_groups=2)
    cells = {page.index(f"<td>{g}</td>"): g for g in groups["group"] if f"<td>{g}</td>" in page}
    shown = [cells[at] for at in sorted(cells)]
    assert shown == ranked.head(2).tolist() + ranked.tail(2).tolist()  # in the page's order
    assert f"{len(groups)} groups" in page and "1 not ranked (no scored image for it)" in page
    assert "every group's figures and counts are in metrics.parquet" in page
    every = render(metrics, details, top_groups=20)
    assert all(f"<td>{g}</td>" in every for g in ranked)


# ---- the CLI ------------------------------------------------------------------------------------------------

def test_cli_options_and_defaults(capsys, maps):
    a = parse_args(["--maps", f"m1={maps / 'm1'}", "--gt", str(maps / "gt"), "--output", "o",
                    "--storage-option", "key=abc", "secret=xyz", "--storage-option", "max_concurrency=4",
                    "--endpoint", "http://127.0.0.1:9"])
    assert a.storage_option == {"key": "abc", "secret": "xyz", "max_concurrency": 4}
    assert a.options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9"} and a.options["secret"] == "xyz"
    assert a.sources[0].image_root() == str(maps / "image")
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    for default in ("(default: 20)", "(default: 6)", "(default: SCoSPARC evaluation)"):
        assert default in help_text, default


def test_cli_writes_report_and_metrics(capsys, maps, tmp_path):
    assert evaluate_main(["--maps", f"m1={maps / 'm1'}", "--maps", f"m2={maps / 'm2'}", "--gt", str(maps / "gt"),
                          "--output", str(tmp_path / "eval"), "--top-groups", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"report:  {tmp_path / 'eval'}/report.html"
    saved = pd.read_parquet(tmp_path / "eval" / "metrics.parquet")
    assert set(saved["label"]) == {"m1", "m2"} and set(saved["scope"]) == {"dataset", "group"}
    assert saved[saved["scope"] == "group"]["precision"].isna().all()
    page = (tmp_path / "eval" / "report.html").read_text()
    assert page.count("<figure>") == 12 and "data:image/jpeg;base64," in page


def test_labels_are_drawn_as_given(maps):
    """No mathtext ("$" in a label failed the whole report) and labels starting with "_" are in the legend."""
    labels = ["x$\\frac$", "_baseline", "cost $5 and $6"]
    metrics, details = evaluate([Source(label, maps=str(maps / m), gt=str(maps / "gt"))
                                 for label, m in zip(labels, ("m1", "m2", "m1"))])
    page = render(metrics, details)
    for label in labels:  # matplotlib's SVG names each text in a comment
        assert page.count(f"<!-- {label} -->") == 2, label  # both plots' legends


def test_metrics_are_written_before_the_report(maps, tmp_path, monkeypatch):
    import jobs.evaluate as job

    def fails(*args, **kwargs):
        raise RuntimeError("the report failed")

    monkeypatch.setattr(job, "render", fails)
    with pytest.raises(RuntimeError, match="the report failed"):
        job.main(["--maps", f"m1={maps / 'm1'}", "--gt", str(maps / "gt"), "--output", str(tmp_path / "eval")])
    saved = pd.read_parquet(tmp_path / "eval" / "metrics.parquet")
    expected, _ = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"))])
    columns = ["label", "scope", "images", "errors", "missing_predictions", *FIGURES]
    pd.testing.assert_frame_equal(saved[columns], expected[columns], check_dtype=False)
    assert saved["group"].fillna("").tolist() == expected["group"].fillna("").tolist()
    assert not (tmp_path / "eval" / "report.html").exists()


def test_labelled_splits_only_a_label(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert labelled("ours=s3://b/runs/r1") == ("ours", "s3://b/runs/r1")
    assert labelled("ours=out/dt=2024-01-01") == ("ours", "out/dt=2024-01-01")
    # a "/" before the "=": a path (Hive-style folder), labelled by its last component
    assert labelled("out/dt=2024-01-01") == ("dt=2024-01-01", "out/dt=2024-01-01")
    assert labelled("s3://b/runs/k=v/") == ("k=v", "s3://b/runs/k=v/")
    assert labelled("out/run") == ("run", "out/run")
    # a label from a URL leaves out its query and fragment
    assert labelled("https://h/p/run?sig=abc#x") == ("run", "https://h/p/run?sig=abc#x")
    (tmp_path / "dt=2024").mkdir()  # an existing path is a path
    assert labelled("dt=2024") == ("dt=2024", "dt=2024")
    assert labelled("dt=2025") == ("dt", "2025")


def test_top_groups_must_be_positive(capsys, maps):
    argv = ["--maps", str(maps / "m1"), "--gt", str(maps / "gt"), "--output", "o"]
    for bad in (["--top-groups", "-3"], ["--top-groups", "0"], ["--gallery", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(argv + bad)
        assert "--top-groups must be at least 1 and --gallery at least 0" in capsys.readouterr().err
    assert parse_args(argv + ["--top-groups", "1", "--gallery", "0"]).top_groups == 1


# ---- a real run and a maps input in one report, rendered in a browser ------------------------------------------

@pytest.fixture(scope="module")
def report(ray_local, tiny_weights, tmp_path_factory):
    """A real inference run on a CoCA-named dataset and a maps input, compared in one report."""
    from pipeline.infer import InferConfig, run_inference
    from pipeline.sample import write_sample

    root = tmp_path_factory.mktemp("report")
    write_sample(str(root / "CoCA"), {"horse": 3, "disc": 2})
    backbone, head = tiny_weights
    run_inference(InferConfig(input=str(root / "CoCA"), output=str(root / "run"), backbone=backbone, head=head,
                              backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT)))
    sources = [Source("scosparc", run=str(root / "run")),
               Source("other-method", maps=str(root / "run" / "masks"), gt=str(root / "CoCA" / "groundtruth"),
                      dataset="CoCA")]
    metrics, details = evaluate(sources)
    ev.write_metrics(str(root / "eval"), {}, metrics)
    ev.write_report(str(root / "eval"), {}, render(metrics, details))
    return root / "eval", metrics, details


def test_two_inputs_give_a_comparison(report):
    folder, metrics, details = report
    table = metrics[metrics["scope"] == "dataset"]
    assert list(table["label"]) == ["scosparc", "other-method"] and set(table["dataset"]) == {"CoCA"}
    # the same masks seen two ways (Parquet metrics vs maps scored here) give the same figures
    a, b = table.iloc[0], table.iloc[1]
    for key in ("max_fm", "sm", "mae", "max_em"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)
    # maps given with --maps get their photos from the CoSOD layout beside --gt
    assert all(r["image_uri"] for side in details["other-method"]["gallery"].values() for r in side)
    saved = pd.read_parquet(folder / "metrics.parquet")
    assert len(saved) == len(metrics) and set(saved["scope"]) == {"dataset", "group"}
    page = (folder / "report.html").read_text()
    for needed in ("scosparc", "other-method", "SCoSPARC (paper)", "0.614", "Precision-recall", "<svg",
                   "F-measure vs threshold", "Per-group max F", "data:image/jpeg;base64,"):
        assert needed in page, needed
    assert "src=\"http" not in page and "href=\"http" not in page  # self-contained


def test_an_unfinished_run_is_read_from_its_commit_records(report, tmp_path, capsys):
    """A shard a job died writing (no record) is not read, and a run without _SUCCESS is named as unfinished."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(report[0].parent / "run", run)
    (shard,) = list((run / "predictions").glob("*.parquet"))
    shutil.copy(shard, run / "predictions" / "part-r0002-deadbeef.parquet")  # every row again, uncommitted
    (run / "_SUCCESS").unlink()
    metrics, _ = evaluate([Source("scosparc", run=str(run))])
    assert "has no _SUCCESS" in capsys.readouterr().err
    before = report[1][report[1]["label"] == "scosparc"].set_index(["scope", "group"])
    after = metrics.set_index(["scope", "group"])
    for key in ("images", "max_fm", "sm", "mae"):
        assert after[key].tolist() == before[key].tolist(), key


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("SCOSPARC_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed")
    folder = report[0]
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--enable-logging=stderr", "--v=0", "--hide-scrollbars", "--window-size=1300,1500"]
    run = subprocess.run([browser, *flags, f"--screenshot={shot}", (folder / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120)
    console = [line for line in run.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    assert shot.exists()
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[0] >= 1000 and image.std() > 20  # a rendered page, not a blank one
    if os.environ.get("SCOSPARC_SCREENSHOT"):  # keep it for a person to look at
        Path(os.environ["SCOSPARC_SCREENSHOT"]).write_bytes(shot.read_bytes())
