"""The inference job on a real local Ray, with the tiny golden ViT."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image

from conftest import TINY_VIT
from pipeline.infer import InferConfig, plan_resources, run_inference
from pipeline.sample import write_sample
from scosparc_core import SCoSPARC


def config(tiny_weights, input, output, **kw):
    backbone, head = tiny_weights
    return InferConfig(input=str(input), output=str(output), backbone=backbone, head=head,
                       backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                       micro_batch=16, progress_interval=0.5, **kw)


def rows(output):
    return pads.dataset(str(Path(output) / "predictions"), format="parquet").to_table().to_pandas()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    write_sample(str(root), {"horse": 4, "disc": 3})
    (root / "image/horse/horse_003.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # a corrupt image
    return root


@pytest.fixture(scope="module")
def first_run(ray_local, tiny_weights, sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    manifest = run_inference(config(tiny_weights, sample, out, chunk_size=2))
    return out, manifest


def test_one_row_per_image_and_an_error_row_for_the_corrupt_file(first_run):
    out, manifest = first_run
    table = rows(out)
    assert len(table) == 7 and table["image_uri"].is_unique
    bad = table[table["name"] == "horse_003.jpg"].iloc[0]
    assert bad["status"] == "error" and bad["error_kind"] == "CorruptImage" and pd.isna(bad["mask_uri"])
    good = table[table["status"] == "ok"]
    assert len(good) == 6 and good["mask_uri"].notna().all() and good["mae"].notna().all()
    assert good["precision"].map(len).eq(256).all()
    assert manifest["output"] == {"rows": 7, "ok": 6, "errors": 1, "errors_by_kind": {"CorruptImage": 1}}
    assert (out / "_SUCCESS").exists() and json.loads((out / "_manifest.json").read_text())["input"]["images"] == 7
    # chunk_size=2: the horse group (4 images) went out as two parts, the disc group (3) as two
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "part-disc-00000-of-00002.parquet", "part-disc-00001-of-00002.parquet",
        "part-horse-00000-of-00002.parquet", "part-horse-00001-of-00002.parquet"]


def test_masks_equal_predict_group_on_the_same_images(first_run, tiny_weights, sample):
    out, _ = first_run
    backbone, head = tiny_weights
    model = SCoSPARC.from_checkpoints(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                                      micro_batch=16, **TINY_VIT)
    table = rows(out).set_index("name")
    for group, names in {"horse": ["horse_000", "horse_001", "horse_002"], "disc": ["disc_000", "disc_001", "disc_002"]}.items():
        images = [Image.open(sample / "image" / group / f"{n}.jpg") for n in names]
        pred = model.predict_group(images, crf="coca")
        for name, expected in zip(names, pred.masks):
            written = np.asarray(Image.open(out / "masks" / group / f"{name}.png"))
            np.testing.assert_array_equal(written, expected)
            row = table.loc[f"{name}.jpg"]
            assert row["threshold"] == pytest.approx(pred.threshold)
            assert (row["height"], row["width"]) == expected.shape


def test_rerun_resumes_without_duplicates(ray_local, first_run, tiny_weights, sample):
    out, _ = first_run
    (out / "predictions" / "part-disc-00001-of-00002.parquet").unlink()  # as if the job died mid-group
    manifest = run_inference(config(tiny_weights, sample, out, chunk_size=2))
    assert manifest["resumed_groups"] == 1 and manifest["processed"] == {"groups": 1, "images": 3}
    table = rows(out)
    assert len(table) == 7 and table["image_uri"].is_unique


def test_rerun_with_other_settings_is_refused_unless_overwrite(ray_local, first_run, tiny_weights, sample):
    out, _ = first_run
    with pytest.raises(RuntimeError, match="other settings.*crf"):
        run_inference(config(tiny_weights, sample, out, crf="none"))
    manifest = run_inference(config(tiny_weights, sample, out, crf="none", overwrite=True, chunk_size=32))
    assert manifest["processed"]["images"] == 7 and len(rows(out)) == 7
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [
        "part-disc-00000-of-00001.parquet", "part-horse-00000-of-00001.parquet"]


def test_plan_for_a_laptop_and_a_gpu_cluster():
    laptop = plan_resources(InferConfig(), {"CPU": 2.0})
    assert laptop.stage1_args == {"num_cpus": 0.5, "num_gpus": 0.0} and laptop.cpu_threads == 2
    assert laptop.stage1_actors == 1 and laptop.refine_actors == 2
    cluster = plan_resources(InferConfig(), {"CPU": 96.0, "GPU": 8.0, "scosparc_head": 1.0})
    assert cluster.stage1_actors == 8 and cluster.stage1_args["num_gpus"] == 1.0
    assert cluster.stage1_args["resources"] == {"scosparc_stage1": 1}
    assert cluster.refine_args == {"num_cpus": 1.0, "resources": {"scosparc_stage2": 1}}
    assert cluster.refine_actors == 79


def test_a_stage1_failure_turns_its_group_into_error_rows(tiny_weights, sample):
    """The actor's per-group work, called directly: a failing backbone must not crash the job or lose rows."""
    from pipeline.decode import decode_group
    from pipeline.listing import list_layout
    from pipeline.infer import group_row
    from pipeline.stage1 import Stage1Actor
    from pipeline.storage import Storage

    backbone, head = tiny_weights
    actor = Stage1Actor({"backbone": backbone, "head": head, "backbone_name": "vit_base_patch8_224",
                         "backbone_kwargs": dict(TINY_VIT)}, chunk_size=2)
    spec = next(g for g in list_layout(Storage(str(sample))) if g.group == "disc")
    row = decode_group(group_row(spec), {})

    def broken(_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    actor.model.features = broken
    chunks = actor.group(row)
    assert [len(c["ok"]) for c in chunks] == [2, 1]
    kinds = [k for c in chunks for k in c["error_kind"]]
    assert kinds == ["Stage1:RuntimeError"] * 3 and not any(ok for c in chunks for ok in c["ok"])


def test_a_manifest_input(ray_local, tiny_weights, sample, tmp_path):
    images = sorted((sample / "image").rglob("*.jpg"))
    frame = pd.DataFrame({
        "group": ["mine"] * len(images),
        "image_uri": [str(p.relative_to(sample)) for p in images],  # relative to the manifest's folder
        "gt_uri": [str(sample / "groundtruth" / p.parent.name / f"{p.stem}.png") for p in images],
    })
    frame.to_csv(sample / "manifest.csv", index=False)
    cfg = config(tiny_weights, sample, tmp_path / "out")
    cfg.input, cfg.manifest = None, str(sample / "manifest.csv")
    manifest = run_inference(cfg)
    table = rows(tmp_path / "out")
    assert manifest["input"] == {"groups": 1, "images": 7, "empty_groups": []}
    assert len(table) == 7 and set(table["group"]) == {"mine"}
    assert table.loc[table["status"] == "ok", "mae"].notna().all()  # ground truth came through the manifest
