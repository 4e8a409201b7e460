"""The inference job on a real local Ray, with the tiny golden ViT."""
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from PIL import Image

from conftest import TINY_ARGS, TINY_VIT
from pipeline.infer import InferConfig, run_inference, stall_timeout
from pipeline.resources import CPU_FLOAT64_EXTRA, GIB, ClusterView, plan_resources
from pipeline.sample import write_sample

ROOT = Path(__file__).resolve().parents[2]


def config(tiny_weights, input, output, **kw):
    backbone, head = tiny_weights
    return InferConfig(input=str(input), output=str(output), backbone=backbone, head=head,
                       backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT),
                       **{"micro_batch": 16, "progress_interval": 0.5, **kw})


def rows(output):
    return pads.dataset(str(Path(output) / "predictions"), format="parquet").to_table().to_pandas()


def records(output):
    return [json.loads(p.read_text()) for p in sorted((Path(output) / "_commits").glob("*.json"))]


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


def test_one_row_per_image_and_an_error_row_for_the_corrupt_file(first_run, sample):
    out, manifest = first_run
    table = rows(out)
    assert len(table) == 7 and table["image_uri"].is_unique
    assert sorted(zip(table["group"], table["index"])) == [("disc", i) for i in range(3)] + [("horse", i) for i in range(4)]
    bad = table[table["name"] == "horse_003.jpg"].iloc[0]
    assert bad["status"] == "error" and bad["error_kind"] == "CorruptImage" and bad["error_class"] == "permanent"
    assert pd.isna(bad["mask_uri"])
    good = table[table["status"] == "ok"]
    assert len(good) == 6 and good["mask_uri"].notna().all() and good["mae"].notna().all()
    assert good["precision"].map(len).eq(256).all() and good["error_class"].isna().all()
    assert manifest["output"] == {"rows": 7, "ok": 6, "errors": 1, "transient_errors": 0, "permanent_errors": 1,
                                  "errors_by_kind": {"CorruptImage": 1}}
    assert (out / "_SUCCESS").exists() and json.loads((out / "_manifest.json").read_text())["input"]["images"] == 7
    # one shard (7 rows < rows_per_shard) and its commit record, which says what it holds
    assert len(list((out / "predictions").iterdir())) == 1
    (record,) = records(out)
    assert record["rows"] == 7 and record["groups"]["horse"]["indices"] == [[0, 4]]
    size = (sample / "image/horse/horse_003.jpg").stat().st_size  # kept: a changed file is redone
    assert record["groups"]["horse"]["errors"] == {"3": ["CorruptImage", "permanent", size]}
    assert not (out / "_lease.json").exists()  # released


def test_masks_equal_predict_group_on_the_same_images(first_run, weights_model, sample):
    out, _ = first_run
    table = rows(out).set_index("name")
    for group, names in {"horse": ["horse_000", "horse_001", "horse_002"], "disc": ["disc_000", "disc_001", "disc_002"]}.items():
        images = [Image.open(sample / "image" / group / f"{n}.jpg") for n in names]
        pred = weights_model.predict_group(images, crf="coca")
        for name, expected in zip(names, pred.masks):
            written = np.asarray(Image.open(out / "masks" / group / f"{name}.png"))
            np.testing.assert_array_equal(written, expected)
            row = table.loc[f"{name}.jpg"]
            assert row["threshold"] == pytest.approx(pred.threshold)
            assert (row["height"], row["width"]) == expected.shape


def test_a_rerun_resumes_from_the_records(ray_local, first_run, tiny_weights, sample, tmp_path):
    out, _ = first_run
    again = run_inference(config(tiny_weights, sample, out, chunk_size=2))
    assert again["processed"] == {"groups": 0, "images": 0} and again["output"]["rows"] == 7

    # a job that died after writing a shard but before its record: the shard goes, its groups are redone
    two = tmp_path / "two"
    run_inference(config(tiny_weights, sample, two, rows_per_shard=1, chunk_size=1))
    recs = records(two)
    lost = recs[0]
    (two / "_commits" / Path(lost["shard"]).with_suffix(".json").name).unlink()
    manifest = run_inference(config(tiny_weights, sample, two, rows_per_shard=1, chunk_size=1))
    assert manifest["processed"] == {"groups": len(lost["groups"]), "images": lost["rows"]}
    table = rows(two)
    assert len(table) == 7 and table["image_uri"].is_unique
    assert not (two / lost["shard"]).exists() or any(r["shard"] == lost["shard"] for r in records(two))


def test_rerun_with_other_settings_or_weights_is_refused_unless_overwrite(ray_local, first_run, tiny_weights, sample,
                                                                        tmp_path):
    import shutil

    from scosparc_core import Stage1Head, save_head_checkpoint

    out, _ = first_run
    with pytest.raises(RuntimeError, match="other settings.*crf"):
        run_inference(config(tiny_weights, sample, out, crf="none"))
    with pytest.raises(RuntimeError, match="other settings.*max_pixels"):
        run_inference(config(tiny_weights, sample, out, max_pixels=10_000))
    (out / "unrelated.txt").write_text("mine")
    manifest = run_inference(config(tiny_weights, sample, out, crf="none", overwrite=True, chunk_size=32))
    assert manifest["processed"]["images"] == 7 and len(rows(out)) == 7
    assert (out / "unrelated.txt").read_text() == "mine"  # --overwrite clears only what the job writes

    # weights are compared by content, not path: a copy of the head is the same head, another head is not
    head = tmp_path / "head.pt"
    shutil.copy(tiny_weights[1], head)
    same = run_inference(config((tiny_weights[0], str(head)), sample, out, crf="none", chunk_size=32))
    assert same["processed"]["images"] == 0
    save_head_checkpoint(Stage1Head(TINY_VIT["embed_dim"]), head)
    with pytest.raises(RuntimeError, match="other settings.*head"):
        run_inference(config((tiny_weights[0], str(head)), sample, out, crf="none", chunk_size=32))


def test_plan_for_a_laptop_a_gpu_cluster_and_an_autoscaling_one():
    laptop = plan_resources(ClusterView({"CPU": 2.0, "memory": 16.0 * GIB}), "cpu")
    wide = plan_resources(ClusterView({"CPU": 2.0, "memory": 16.0 * GIB}), "cpu", precision="float64")
    assert wide.stage1_args["memory"] - laptop.stage1_args["memory"] == CPU_FLOAT64_EXTRA  # float64's larger peak
    assert laptop.stage1_args == {"num_gpus": 0, "num_cpus": 0.25, "memory": 3 * GIB} and laptop.cpu_threads == 2
    small = plan_resources(ClusterView({"CPU": 2.0, "memory": 4.0 * GIB}), "cpu")
    assert small.stage1_args["memory"] == 2 * GIB  # never more than half of what Ray has: it must be placeable
    assert laptop.stage1_actors == (1, 1) and laptop.crf_backend == "defer"
    asked = plan_resources(ClusterView({"CPU": 2.0}), "cpu", crf_backend="torch", gpu_actors=2)
    assert asked.crf_backend == "torch"  # asked for: the torch CRF runs beside stage 1 on CPUs too
    assert any("--gpu-actors" in note for note in asked.notes)  # said, not silently dropped
    gpus = plan_resources(ClusterView({"CPU": 128.0, "GPU": 8.0}), "cuda", mean_group=16)
    assert gpus.stage1_actors == (1, 8) and gpus.stage1_args["num_gpus"] == 1.0 and gpus.crf_backend == "torch"
    assert gpus.stage1_calls == 2 and gpus.groups_per_batch == 16  # 2 x 128 images per call
    # cluster.yaml at submit time: no worker yet, but 8 GPU nodes declared
    types = {"gpu_stage1": {"resources": {"CPU": 8, "GPU": 1, "scosparc_stage1": 1}, "max_workers": 8},
             "cpu_stage2": {"resources": {"CPU": 32, "scosparc_stage2": 32}, "max_workers": 32}}
    view = ClusterView({"CPU": 0.0, "scosparc_head": 1.0, "GPU": 1.0}, types)
    ours = plan_resources(view, "cuda", crf_backend="pydensecrf")
    assert ours.stage1_actors == (1, 8) and ours.stage1_args["resources"] == {"scosparc_stage1": 1.0}
    assert ours.stage1_args["num_cpus"] == 2.0  # a quarter of the GPU node, not of the cluster
    assert ours.refine_args == {"num_cpus": 1, "resources": {"scosparc_stage2": 1}}  # CPU CRF on CPU nodes only
    assert ours.refine_actors == (1, 32 * 32)  # counted from the CPU node type, not the GPU nodes' cores
    assert gpus.refine_actors == (1, 128 - 8 * 4)  # what the 8 stage-1 actors leave


def test_stage1_actors_are_sized_from_gpu_nodes_and_refused_when_no_node_can_hold_one(monkeypatch):
    from pipeline import resources
    from pipeline.resources import unplaceable

    monkeypatch.setattr(resources, "cluster_can_grow", lambda: False)  # a fixed cluster (no autoscaler)

    # no cluster config: a 2-core GPU node beside a 32-core CPU node gets an actor its cores allow
    nodes = ({"CPU": 32.0, "memory": 64.0 * GIB}, {"CPU": 2.0, "GPU": 1.0, "memory": 16.0 * GIB})
    view = ClusterView({"CPU": 34.0, "GPU": 1.0, "memory": 80.0 * GIB}, {}, nodes)
    plan = plan_resources(view, "cuda")
    assert plan.stage1_args["num_cpus"] == 1.0 and unplaceable(plan.stage1_args, view) is None
    two = plan_resources(view, "cuda", gpus_per_actor=2)
    assert "lower --gpus-per-actor" in unplaceable(two.stage1_args, view)  # Ray would keep it pending
    # an autoscaling cluster before its GPU nodes start: the declared node type decides
    types = {"gpu": {"resources": {"CPU": 8, "GPU": 1, "scosparc_stage1": 1}, "max_workers": 8}}
    ours = ClusterView({"CPU": 0.0, "scosparc_head": 1.0}, types, ({"CPU": 0.0, "scosparc_head": 1.0},))
    assert unplaceable(plan_resources(ours, "cuda").stage1_args, ours) is None
    assert "no declared node type" in unplaceable(plan_resources(ours, "cuda", gpus_per_actor=2).stage1_args, ours)
    laptop = ClusterView({"CPU": 2.0, "memory": 16.0 * GIB}, {}, ({"CPU": 2.0, "memory": 16.0 * GIB},))
    assert unplaceable(plan_resources(laptop, "cpu").stage1_args, laptop) is None
    monkeypatch.setattr(resources, "cluster_can_grow", lambda: True)  # it may grow into types we cannot read
    assert unplaceable(two.stage1_args, view) is None


def test_our_cluster_without_gpus_fails_clearly_within_the_wait(tmp_path, tiny_weights, sample):
    """A head that advertises the cluster.yaml marker and no GPU: the job asks, waits --gpu-wait (where an
    autoscaler could add a GPU node: a local Ray has none, so the test says it has), then fails with exit code 2
    and a one-line reason; with no autoscaler it fails at once; with --device cpu the same job runs on that
    head's CPU."""
    backbone, head = tiny_weights
    args = ["--input", str(sample), "--output", str(tmp_path / "out"), "--backbone", backbone, "--head", head,
            *TINY_ARGS]
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import ray
        from jobs.infer import main
        from pipeline import resources
        ray.init(address="local", num_cpus=1, resources={{"scosparc_head": 1}}, include_dashboard=False)
        start = time.monotonic()
        print("NOGROW", main({args!r} + ["--device", "cuda"]), round(time.monotonic() - start), flush=True)
        resources.cluster_can_grow = lambda: True
        start = time.monotonic()
        code = main({args!r} + ["--gpu-wait", "3"])
        print("GPU", code, round(time.monotonic() - start), flush=True)
        print("CPU", main({args!r} + ["--device", "cpu", "--crf", "none"]), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    out, err = done.stdout, done.stderr
    assert "NOGROW 2 " in out and "error: no GPU in this Ray cluster, and it has no autoscaler" in err, err[-3000:]
    assert int(out.split("NOGROW 2 ")[1].split()[0]) < 30  # not --gpu-wait's 600 s
    assert "GPU 2 " in out and "error: no GPU appeared within 3s" in err and "--device cpu" in err, err[-3000:]
    assert int(out.split("GPU 2 ")[1].split()[0]) < 60
    assert "CPU 0" in out and "rows 7 (ok 6, errors 1" in out  # --device cpu runs on CPUs on purpose


def test_dry_run_lists_and_plans_without_writing(ray_local, tiny_weights, sample, tmp_path, monkeypatch):
    from pipeline import infer

    withdrawn = []  # a dry run asks the autoscaler for nothing: withdrawing would drop another job's request
    monkeypatch.setattr(infer, "release_requests", lambda: withdrawn.append(1))
    report = run_inference(config(tiny_weights, sample, tmp_path / "out", dry_run=True))
    assert report["input"]["groups"] == 2 and report["input"]["images"] == 7 and report["device"] == "cpu"
    assert not (tmp_path / "out").exists()
    assert withdrawn == []
    # a cluster with GPUs: the plan is CUDA's, --dtype auto resolved in the driver (float32, as on every card)
    nodes = ({"CPU": 2.0, "memory": 16.0 * GIB}, {"CPU": 8.0, "GPU": 1.0, "memory": 64.0 * GIB})
    monkeypatch.setattr(infer, "cluster_view", lambda: ClusterView({"CPU": 10.0, "GPU": 1.0}, {}, nodes))
    for dtype, want, micro_batch in (("auto", "float32", 128), ("float64", "float64", 64)):
        report = run_inference(config(tiny_weights, sample, tmp_path / "out", dry_run=True, device="auto",
                                      dtype=dtype, micro_batch=None))
        assert (report["device"], report["precision"], report["micro_batch"]) == ("cuda", want, micro_batch)


def test_a_stage1_failure_turns_its_group_into_error_rows(tiny_weights, sample):
    """The actor's work on a batch, called directly: a failing engine must not crash the job or lose rows."""
    from pipeline.decode import DecodeSettings, decode_group
    from pipeline.listing import group_row, list_layout
    from pipeline.output_state import mark_todo
    from pipeline.stage1 import ModelSettings, Stage1Actor, Stage1Settings
    from pipeline.storage import Storage

    backbone, head = tiny_weights
    settings = Stage1Settings(model=ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                                                  backbone_kwargs=dict(TINY_VIT)), decode=DecodeSettings(),
                              chunk_size=2, crf="none")
    actor = Stage1Actor(settings)
    spec = next(g for g in list_layout(Storage(str(sample))) if g.group == "disc")
    row = decode_group(mark_todo(group_row(spec), None)[0], DecodeSettings())
    batch = {k: [v] for k, v in row.items()}

    def broken(*args, **kwargs):
        raise RuntimeError("the backbone broke")  # not a CUDA error: that would end this process

    actor.engine.run = broken
    chunks = list(actor(batch))
    kinds = [k for c in chunks for chunk in c["error_kind"] for k in chunk]
    assert [len(i) for c in chunks for i in c["index"]] == [2, 1]
    assert kinds == ["Stage1:RuntimeError"] * 3 and not any(ok for c in chunks for o in c["ok"] for ok in o)


def test_stage1_seconds_share_a_batch_of_groups_time_among_its_images(tiny_weights, sample):
    """``stage1_s`` is the batch's engine time per image: the same for every image of the batch, and summed over
    the rows it is the time the call took, not once per group (it was the time since the batch began divided by
    each group's own images)."""
    import time

    from pipeline.decode import DecodeSettings, decode_group
    from pipeline.listing import group_row, list_layout
    from pipeline.output_state import mark_todo
    from pipeline.stage1 import ModelSettings, Stage1Actor, Stage1Settings
    from pipeline.storage import Storage

    backbone, head = tiny_weights
    model = ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                          backbone_kwargs=dict(TINY_VIT))
    rows = [decode_group(mark_todo(group_row(g), None)[0], DecodeSettings())
            for g in list_layout(Storage(str(sample)))]  # disc (3 images), horse (4, one does not decode)
    actor = Stage1Actor(Stage1Settings(model=model, decode=DecodeSettings(), crf="none"))
    run = actor.engine.run
    actor.engine.run = lambda *a, **k: time.sleep(0.5) or run(*a, **k)  # the engine's time: at least 0.5 s
    start = time.perf_counter()
    out = list(actor({k: [r[k] for r in rows] for k in rows[0]}))
    wall = time.perf_counter() - start
    seconds = [s for c in out for s, oks in zip(c["stage1_s"], c["ok"]) for _ in oks]
    ok = sum(o for c in out for oks in c["ok"] for o in oks)
    assert ok == 6 and len(seconds) == 7 and len(set(seconds)) == 1
    assert 0.5 <= seconds[0] * ok <= wall


def test_a_batch_of_groups_goes_to_the_engine_in_calls_of_at_most_one_pass_of_images(tiny_weights, sample):
    """Batches are sized in groups from the mean group size; a batch that brings many images anyway is split, so
    that the device holds at most --one-pass-images images' tokens at once. The masks do not change."""
    from pipeline.decode import DecodeSettings, decode_group
    from pipeline.listing import group_row, list_layout
    from pipeline.output_state import mark_todo
    from pipeline.stage1 import ModelSettings, Stage1Actor, Stage1Settings
    from pipeline.storage import Storage

    backbone, head = tiny_weights
    model = ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                          backbone_kwargs=dict(TINY_VIT))
    rows = [decode_group(mark_todo(group_row(g), None)[0], DecodeSettings())
            for g in list_layout(Storage(str(sample)))]  # disc (3 images), horse (4)
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    finals = {}
    for limit in (2048, 4):
        actor = Stage1Actor(Stage1Settings(model=model, decode=DecodeSettings(), crf="none", one_pass_images=limit))
        calls = []
        run = actor.engine.run
        actor.engine.run = lambda pixels, *a, **k: calls.append([len(p) for p in pixels]) or run(pixels, *a, **k)
        out = list(actor(dict(batch)))
        finals[limit] = {(g, i): f for c in out for g, idx, fs in zip(c["group"], c["index"], c["final"])
                         for i, f in zip(idx, fs)}
        assert sum(map(sum, calls)) == 6  # horse_003 does not decode
        assert (len(calls) == 1) if limit == 2048 else (len(calls) == 2 and max(map(sum, calls)) <= 4)
    assert finals[4].keys() == finals[2048].keys() and len(finals[4]) == 7
    for key, final in finals[2048].items():
        np.testing.assert_array_equal(np.asarray(final), np.asarray(finals[4][key]))


def test_a_ground_truth_read_that_may_work_later_is_an_error_row_a_re_run_redoes(tiny_weights, sample, tmp_path,
                                                                                 monkeypatch):
    """A ground truth that is not there (permanent) loses the image's metrics, not its row; one whose read failed
    after the client's retries (S3 SlowDown, a timeout) would lose them for good if the row stayed ok: it is a
    transient error row, so the resume redoes the image."""
    from pipeline import refine
    from pipeline.decode import DecodeSettings, ReadError, decode_group
    from pipeline.listing import group_row, list_layout
    from pipeline.output_state import mark_todo
    from pipeline.stage1 import ModelSettings, Stage1Actor, Stage1Settings
    from pipeline.storage import Storage

    backbone, head = tiny_weights
    model = ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                          backbone_kwargs=dict(TINY_VIT))
    spec = next(g for g in list_layout(Storage(str(sample))) if g.group == "horse")
    row = decode_group(mark_todo(group_row(spec), None)[0], DecodeSettings())
    (chunk,) = [c for c in Stage1Actor(Stage1Settings(model=model, decode=DecodeSettings(), crf="none"))(
        {k: [v] for k, v in row.items()})]
    chunk = {k: v[0] for k, v in chunk.items()}  # one chunk of 4 images

    read_many = refine.read_many

    def flaky(uris, options):
        data = read_many(uris, options)
        return [ReadError(uris[0], TimeoutError("read timed out")), ReadError(uris[1], FileNotFoundError(uris[1])),
                *data[2:]]

    settings, out = refine.RefineSettings(output=str(tmp_path / "out"), crf="none"), Storage(str(tmp_path / "out"))
    monkeypatch.setattr(refine, "read_many", flaky)
    recs = refine.refine_chunk(chunk, settings, out)
    assert [(r["status"], r["error_class"]) for r in recs] == [
        ("error", "transient"), ("ok", None), ("ok", None), ("error", "permanent")]  # horse_003 is corrupt
    assert recs[0]["error_kind"].startswith("GroundTruth:") and "timed out" in recs[0]["error"]
    assert recs[1]["gt_error"] and recs[1].get("mae") is None  # not there: no metrics, the row stays ok
    assert recs[2].get("mae") is not None

    # files that were read but will never decode as masks (PIL raises OSErrors without errno for them, which
    # read as transient): metrics lost, the row stays ok - a re-run would fail the same way, for ever
    png = (sample / "groundtruth/horse/horse_000.png").read_bytes()
    for bad in (b"<!doctype html><html>denied</html>", png[: len(png) // 2], b""):
        monkeypatch.setattr(refine, "read_many", lambda uris, options, bad=bad: [bad] * len(uris))
        rec = refine.refine_chunk(chunk, settings, out)[0]
        assert (rec["status"], rec["error_class"]) == ("ok", None) and rec["gt_error"], bad[:10]


def test_a_manifest_input(ray_local, tiny_weights, sample, tmp_path):
    images = sorted((sample / "image").rglob("*.jpg"))
    frame = pd.DataFrame({
        "group": ["mine"] * len(images),
        "image_uri": [str(p.relative_to(sample)) for p in images],  # relative to the manifest's folder
        "gt_uri": [str(sample / "groundtruth" / p.parent.name / f"{p.stem}.png") for p in images],
    })
    frame.to_csv(sample / "manifest.csv.gz", index=False)
    cfg = config(tiny_weights, sample, tmp_path / "out").replace(input=None, manifest=str(sample / "manifest.csv.gz"),
                                                                 crf="none")
    manifest = run_inference(cfg)
    table = rows(tmp_path / "out")
    assert manifest["input"]["groups"] == 1 and manifest["input"]["images"] == 7
    assert len(table) == 7 and set(table["group"]) == {"mine"}
    assert table.loc[table["status"] == "ok", "mae"].notna().all()  # ground truth came through the manifest


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_mask_formats_for_many_small_objects(ray_local, tiny_weights, sample, tmp_path, fmt):
    import io
    import tarfile

    out = tmp_path / fmt
    run_inference(config(tiny_weights, sample, out, crf="none", mask_format=fmt))
    table = rows(out)
    assert not (out / "masks" / "horse").exists()  # no PNG object per image
    ok = table[table["status"] == "ok"]
    if fmt == "parquet":
        pngs = ok["mask_png"]
    else:
        (tar_path,) = (out / "masks").glob("shard-*.tar")
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        pngs = [members[u.split("#", 1)[1]] for u in ok["mask_uri"]]
        assert sorted(members) == sorted(f"{g}/{Path(n).stem}.png" for g, n in zip(ok["group"], ok["name"]))
    for png, (h, w) in zip(pngs, zip(ok["height"], ok["width"])):
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (h, w)


def test_a_job_without_output_for_its_stall_timeout_stops_and_the_default_allows_for_the_largest_group(
        ray_local, tiny_weights, sample, tmp_path):
    # a group gives no row before its whole stage 1: Ray Data's fixed 30 min stopped a 10,000-image group
    assert stall_timeout(InferConfig(), "cpu", 10_000) > stall_timeout(InferConfig(), "cpu", 100) > 1800
    assert stall_timeout(InferConfig(), "cpu", 10_000) > stall_timeout(InferConfig(), "cuda", 10_000) > 1800
    assert stall_timeout(InferConfig(stall_timeout=-1), "cpu", 10_000) == -1  # never
    cfg = config(tiny_weights, sample, tmp_path / "out", crf="none", stall_timeout=5, fault={"delay_s": 120})
    start = time.monotonic()
    with pytest.raises(Exception, match="no progress for at least 5"):
        run_inference(cfg)
    assert time.monotonic() - start < 100  # stopped by the timeout, not after the stalled stage 1
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out" / "_lease.json").exists()


def test_a_rerun_redoes_groups_whose_shards_are_gone(ray_local, tiny_weights, sample, tmp_path):
    """Records without their shards (an --overwrite cut short after the shards, shards deleted by hand): the
    resume must not count rows that are not there and write _SUCCESS over an empty predictions/."""
    out = tmp_path / "out"
    cfg = config(tiny_weights, sample, out, crf="none")
    run_inference(cfg)
    for shard in (out / "predictions").glob("*.parquet"):
        shard.unlink()
    manifest = run_inference(cfg)
    assert manifest["processed"] == {"groups": 2, "images": 7} and manifest["output"]["rows"] == 7
    assert len(rows(out)) == 7 and (out / "_SUCCESS").exists()


def test_a_mask_that_cannot_be_written_is_a_transient_error_redone_once_the_output_is_fixed(
        ray_local, tiny_weights, sample, tmp_path):
    """The failure is the output's (a file where the group folder goes; access denied, a read-only mount), not the
    image's: the rows must not be permanent errors that no re-run redoes, and _SUCCESS stays off until then."""
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "horse").write_text("in the way")
    cfg = config(tiny_weights, sample, out, crf="none")
    first = run_inference(cfg)
    table = rows(out).set_index("name")
    blocked = table.loc[[f"horse_00{i}.jpg" for i in range(3)]]
    assert (blocked["error_class"] == "transient").all() and blocked["error_kind"].str.startswith("Refine:").all()
    assert first["output"]["transient_errors"] == 3 and not (out / "_SUCCESS").exists()

    (out / "masks" / "horse").unlink()
    second = run_inference(cfg)
    assert second["processed"] == {"groups": 1, "images": 3} and second["output"]["transient_errors"] == 0
    assert (out / "_SUCCESS").exists() and len(list((out / "masks" / "horse").glob("*.png"))) == 3


def webdataset_samples(tar_path) -> list[dict]:
    """The samples webdataset reads from a tar. webdataset is not a dependency, so this is its rule, spelled out
    (webdataset.tariterators: ``base_plus_ext`` and ``group_by_keys``): a member's key is its name up to the first
    dot of its basename, the rest is the field; consecutive members with the same key are one sample."""
    import re
    import tarfile

    samples: list[dict] = []
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            key, field = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", member.name).groups()
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][field] = tar.extractfile(member).read()
    return samples


def test_webdataset_reads_one_sample_per_image_whatever_dots_the_names_hold(ray_local, tiny_weights, tmp_path):
    import io

    data, out = tmp_path / "data", tmp_path / "out"
    write_sample(str(data), {"horse": 3, "disc": 1})
    names = ["cam1.frame1", "cam1.frame2", "cam1_frame1"]  # the last is what the first becomes without its dot
    for kind, ext in (("image", "jpg"), ("groundtruth", "png")):
        group = data / kind / "horse"
        for i, name in enumerate(names):
            (group / f"horse_00{i}.{ext}").rename(group / f"{name}.{ext}")
        group.rename(data / kind / "cams.v2")
    run_inference(config(tiny_weights, data, out, crf="none", mask_format="webdataset"))
    table = rows(out)
    assert sorted(table["name"]) == sorted(["cam1.frame1.jpg", "cam1.frame2.jpg", "cam1_frame1.jpg", "disc_000.jpg"])
    assert (table["status"] == "ok").all() and set(table["group"]) == {"cams.v2", "disc"}
    (tar_path,) = (out / "masks").glob("shard-*.tar")
    samples = {s.pop("__key__"): s for s in webdataset_samples(tar_path)}
    assert len(samples) == len(table) and all(set(s) == {"png"} for s in samples.values())
    for uri, h, w in zip(table["mask_uri"], table["height"], table["width"]):
        tar_url, member = uri.split("#", 1)
        assert tar_url.endswith(tar_path.name) and member.endswith(".png")
        png = samples[member.removesuffix(".png")]["png"]  # the row names the sample it reads
        assert np.asarray(Image.open(io.BytesIO(png))).shape == (h, w)


def test_extensions_are_checked_and_recorded_only_when_given(ray_local, tiny_weights, sample, tmp_path,
                                                             monkeypatch):
    """--extensions: refused with a manifest, when it names nothing, and when no file has them (a typo is not a
    successful run of nothing); in the run's settings only when given, so runs recorded before the option resume
    as they were."""
    from pipeline.infer import fingerprint, validate

    with pytest.raises(ValueError, match="a manifest lists its images"):
        validate(config(tiny_weights, tmp_path, tmp_path / "out", manifest="m.csv", extensions=("jpg",)))
    with pytest.raises(ValueError, match="name no file extension"):
        validate(config(tiny_weights, tmp_path, tmp_path / "out", extensions=(" ", ".")))
    assert "extensions" not in fingerprint(config(tiny_weights, tmp_path, tmp_path / "out"), {}, "float32", "none")
    given = config(tiny_weights, tmp_path, tmp_path / "out", extensions=("JPG", ".png"))
    assert fingerprint(given, {}, "float32", "none")["extensions"] == ["jpg", "png"]
    assert given.spec().extensions == ("jpg", "png")
    from jobs.infer import parse_args

    assert parse_args(["--input", str(tmp_path), "--extensions", "JPG,.png"])[0].extensions == ("jpg", "png")
    for bad in (" , ", "tar.gz"):
        with pytest.raises(SystemExit):
            parse_args(["--input", str(tmp_path), "--extensions", bad])
    from pipeline import resources

    # a cluster that could grow GPU nodes: the input is listed while they start, and a typo is refused then,
    # not after the wait (none comes here: the error would be "no GPU appeared")
    monkeypatch.setattr(resources, "cluster_can_grow", lambda: True)
    with pytest.raises(ValueError, match="has one of the extensions jgp"):
        run_inference(config(tiny_weights, sample, tmp_path / "typo", extensions=("jgp",), crf="none", device="cuda",
                             gpu_wait=30))
    with pytest.raises(ValueError, match="has one of the extensions jgp"):  # the dry run's plan refuses it too
        run_inference(config(tiny_weights, sample, tmp_path / "typo", extensions=("jgp",), dry_run=True))
