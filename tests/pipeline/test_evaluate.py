"""Offline evaluation: values against pysodmetrics, exact aggregation, the comparison report in a browser."""
import os
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import TINY_VIT
from pipeline.evaluate import Source, evaluate, write_outputs
from pipeline.infer import InferConfig, run_inference
from pipeline.report import render
from pipeline.sample import synthetic_group, write_sample
from scosparc_core.metrics import aggregate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from py_sod_metrics import MAE, Emeasure, Fmeasure, Smeasure, WeightedFmeasure


def noisy_map(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible soft prediction: the ground truth blurred, shifted and with noise."""
    soft = np.roll(gt.astype(np.float32), rng.integers(-12, 12, size=2), axis=(0, 1))
    soft = soft * rng.uniform(0.5, 1.0) + rng.normal(0, 35, size=gt.shape)
    return np.clip(soft, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def maps(tmp_path_factory):
    """Two methods' maps and the ground truth, for 2 groups of synthetic images (exact masks)."""
    root = tmp_path_factory.mktemp("maps")
    rng = np.random.default_rng(3)
    for kind, n in (("horse", 4), ("disc", 3)):
        for i, (_, gt) in enumerate(synthetic_group(kind, n)):
            for sub, array in (("gt", gt), ("m1", noisy_map(gt, rng)), ("m2", noisy_map(gt, rng))):
                (root / sub / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(root / sub / kind / f"{kind}_{i:03d}.png")
    return root


def test_values_equal_pysodmetrics_one_pass(maps):
    metrics, _ = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"), dataset="toy")])
    ours = metrics[metrics["scope"] == "dataset"].iloc[0]
    fm, em, sm, wfm, mae = Fmeasure(), Emeasure(), Smeasure(), WeightedFmeasure(), MAE()
    for gt_path in sorted((maps / "gt").rglob("*.png")):
        pred = np.asarray(Image.open(maps / "m1" / gt_path.relative_to(maps / "gt")))
        gt = np.asarray(Image.open(gt_path))
        for m in (fm, em, sm, wfm, mae):
            m.step(pred=pred, gt=gt)
    f, e = fm.get_results(), em.get_results()
    expected = {"max_fm": f["fm"]["curve"].max(), "mean_fm": f["fm"]["curve"].mean(), "adp_fm": f["fm"]["adp"],
                "max_em": e["em"]["curve"].max(), "mean_em": e["em"]["curve"].mean(), "adp_em": e["em"]["adp"],
                "sm": sm.get_results()["sm"], "wfm": wfm.get_results()["wfm"], "mae": mae.get_results()["mae"]}
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-12, rel=0), key
    np.testing.assert_allclose(ours["precision"], f["pr"]["p"], atol=1e-12)
    np.testing.assert_allclose(ours["recall"], f["pr"]["r"], atol=1e-12)
    assert ours["images"] == 7


def test_aggregation_is_exact_whatever_the_split(maps):
    _, details = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"))])
    rows = details["m1"]["rows"].to_dict("records")
    whole = aggregate(rows)
    for seed in range(3):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        again = aggregate(shuffled)
        for key in ("max_fm", "mean_fm", "sm", "mae", "max_em", "wfm"):
            assert again[key] == whole[key]  # bit for bit, not approximately
        assert np.array_equal(again["fm_curve"], whole["fm_curve"])


def test_nothing_to_score_gives_nan_not_an_error():
    empty = aggregate([])
    assert empty["images"] == 0 and np.isnan(empty["max_fm"]) and np.isnan(empty["fm_curve"]).all()


def test_ray_data_scoring_equals_local(ray_local, maps):
    local, _ = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"))])
    on_ray, _ = evaluate([Source("m1", maps=str(maps / "m1"), gt=str(maps / "gt"))], use_ray=True)
    cols = ["max_fm", "mean_fm", "sm", "mae", "max_em", "mean_em", "wfm", "adp_fm", "adp_em"]
    key = ["scope", "group"]
    a = local.sort_values(key, na_position="first")[cols].to_numpy(float)
    b = on_ray.sort_values(key, na_position="first")[cols].to_numpy(float)
    assert np.array_equal(a, b)


@pytest.fixture(scope="module")
def report(ray_local, tiny_weights, maps, tmp_path_factory):
    """A real inference run on a CoCA-named dataset and a maps input, compared in one report."""
    root = tmp_path_factory.mktemp("report")
    write_sample(str(root / "CoCA"), {"horse": 3, "disc": 2})
    backbone, head = tiny_weights
    run_inference(InferConfig(input=str(root / "CoCA"), output=str(root / "run"), backbone=backbone, head=head,
                              backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT)))
    sources = [Source("scosparc", run=str(root / "run")),
               Source("other-method", maps=str(root / "run" / "masks"), gt=str(root / "CoCA" / "groundtruth"),
                      dataset="CoCA")]
    metrics, details = evaluate(sources)
    write_outputs(str(root / "eval"), {}, metrics, render(metrics, details))
    return root / "eval", metrics


def test_two_inputs_give_a_comparison(report):
    folder, metrics = report
    table = metrics[metrics["scope"] == "dataset"]
    assert list(table["label"]) == ["scosparc", "other-method"] and set(table["dataset"]) == {"CoCA"}
    # the same masks seen two ways (Parquet metrics vs maps scored here) give the same figures
    a, b = table.iloc[0], table.iloc[1]
    for key in ("max_fm", "sm", "mae", "max_em"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)
    saved = pd.read_parquet(folder / "metrics.parquet")
    assert len(saved) == len(metrics) and set(saved["scope"]) == {"dataset", "group"}
    page = (folder / "report.html").read_text()
    for needed in ("scosparc", "other-method", "SCoSPARC (paper)", "0.614", "Precision-recall", "<svg",
                   "F-measure vs threshold", "Per-group max F", "data:image/jpeg;base64,"):
        assert needed in page, needed
    assert "src=\"http" not in page and "href=\"http" not in page  # self-contained


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("SCOSPARC_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium not installed")
    folder, _ = report
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
