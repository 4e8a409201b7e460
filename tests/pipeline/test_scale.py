"""Issue 11 at test size: a large group run in passes gives the one-pass results, and outputs come in few shards
whose commit records add up. (The figures at scale: benchmarks/bench_scale.py.)"""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_VIT
from pipeline.decode import DecodeSettings, decode_group
from pipeline.infer import InferConfig, run_inference
from pipeline.listing import group_row, list_layout
from pipeline.output_state import mark_todo
from pipeline.predictions import from_ranges
from pipeline.sample import write_sample
from pipeline.stage1 import ModelSettings, Stage1Actor, Stage1Settings
from pipeline.storage import Storage

BIG, SMALL = 24, 3  # one group larger than one pass below, one small enough to be decoded in a row
PASSES = dict(row_images=8, one_pass_images=10)


def config(tiny_weights, input, output, **kw):
    backbone, head = tiny_weights
    return InferConfig(input=str(input), output=str(output), backbone=backbone, head=head,
                       backbone_name="vit_base_patch8_224", backbone_kwargs=dict(TINY_VIT), micro_batch=8,
                       progress_interval=5.0, **kw)


def rows(output) -> pd.DataFrame:
    return pd.concat([pq.read_table(p).to_pandas() for p in sorted((Path(output) / "predictions").glob("*.parquet"))])


def records(output) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((Path(output) / "_commits").glob("*.json"))]


@pytest.fixture(scope="module")
def big_group(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    write_sample(str(root), {"horse": BIG, "disc": SMALL})
    (root / "image/disc/disc_002.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # an error row
    return root


@pytest.fixture(scope="module")
def big_group_with_error(big_group, tmp_path_factory):
    """The same input with a corrupt image inside the big group: the passes skip it."""
    root = tmp_path_factory.mktemp("big-error") / "input"
    shutil.copytree(big_group, root)
    (root / "image/horse/horse_017.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_a_group_in_passes_gives_the_masks_of_predict_group(ray_local, tiny_weights, weights_model, big_group,
                                                           tmp_path):
    """The job with settings that read the big group in the stage-1 actor and run it in passes writes the masks
    and the threshold that ``predict_group`` (one pass, in-process) gives for the same images."""
    out = tmp_path / "passes"
    manifest = run_inference(config(tiny_weights, big_group, out, crf="coca", **PASSES))
    assert manifest["config"]["one_pass_images"] == 10 < BIG
    assert manifest["output"]["rows"] == BIG + SMALL and manifest["output"]["errors_by_kind"] == {"CorruptImage": 1}
    table = rows(out)
    ok = table[table["status"] == "ok"]
    assert len(ok) == BIG + SMALL - 1 and ok["mae"].notna().all()
    for group in ("horse", "disc"):
        mine = ok[ok["group"] == group].sort_values("index")
        pred = weights_model.predict_group([Image.open(big_group / "image" / group / n) for n in mine["name"]], crf="coca")
        assert mine["threshold"].tolist() == pytest.approx([pred.threshold] * len(mine))  # one tau per group
        for uri, expected in zip(mine["mask_uri"], pred.masks):
            written = out / "masks" / uri.split("/masks/", 1)[1]
            np.testing.assert_array_equal(np.asarray(Image.open(written)), expected, err_msg=uri)


def _actor_output(settings: Stage1Settings, row: dict, spy: list) -> dict:
    actor = Stage1Actor(settings)
    run_passes = actor.engine.run_passes

    def counted(*args, **kwargs):
        spy.append(args[0])
        yield from run_passes(*args, **kwargs)

    actor.engine.run_passes = counted
    row = decode_group(row, settings.decode)
    out: dict = {}
    for part in actor({k: [v] for k, v in row.items()}):
        for k, v in part.items():
            out.setdefault(k, []).extend(v)
    return out


@pytest.fixture(scope="module")
def actor_outputs(tiny_weights, big_group_with_error):
    """The stage-1 actor's output rows for the big group (with its corrupt image), in passes and in one pass,
    and the sizes the engine's passes were called with."""
    backbone, head = tiny_weights
    model = ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                          backbone_kwargs=dict(TINY_VIT))
    (spec,) = [g for g in list_layout(Storage(str(big_group_with_error))) if g.group == "horse"]
    (row,) = mark_todo(group_row(spec), None)
    results = {}
    for name, settings in {"passes": PASSES, "one pass": {}}.items():
        spy: list = []
        stage1 = Stage1Settings(model=model, decode=DecodeSettings(row_images=settings.get("row_images", 32)),
                                micro_batch=8, crf="none", crf_backend="defer",
                                one_pass_images=settings.get("one_pass_images", 2048))
        results[name] = (_actor_output(stage1, row, spy), spy)
    return results


def test_the_settings_above_take_the_passes_and_the_engine_matches_one_pass(actor_outputs):
    """The job above is not vacuous: with these settings the stage-1 actor reads the big group itself and runs
    the engine's passes (once, over the images that decode), and its masks are those of one pass."""
    (out, spy), (ref, ref_spy) = actor_outputs["passes"], actor_outputs["one pass"]
    assert spy == [BIG - 1] and ref_spy == []
    order = np.argsort([i for idx in out["index"] for i in idx])
    ref_order = np.argsort([i for idx in ref["index"] for i in idx])
    final = np.concatenate(out["final"])[order]
    assert final.shape == (BIG, 224, 224) and final.any()
    np.testing.assert_array_equal(final, np.concatenate(ref["final"])[ref_order])
    ok = np.concatenate(out["ok"])[order] if isinstance(out["ok"][0], np.ndarray) else \
        np.array([o for chunk in out["ok"] for o in chunk])[order]
    assert ok.sum() == BIG - 1 and not ok[17]
    assert {t for t in out["threshold"] if t == t} == {t for t in ref["threshold"] if t == t}


def test_a_group_that_fails_after_its_first_chunk_has_one_row_per_image(tiny_weights, big_group_with_error):
    """The rows already out stay; the images after them become error rows, each image exactly once (two rows for
    one image would make the run's counts wrong)."""
    backbone, head = tiny_weights
    settings = Stage1Settings(model=ModelSettings(backbone=backbone, head=head, backbone_name="vit_base_patch8_224",
                                                  backbone_kwargs=dict(TINY_VIT)),
                              decode=DecodeSettings(row_images=PASSES["row_images"]), micro_batch=8, crf="none",
                              crf_backend="defer", one_pass_images=PASSES["one_pass_images"], chunk_size=8)
    (spec,) = [g for g in list_layout(Storage(str(big_group_with_error))) if g.group == "horse"]
    (row,) = mark_todo(group_row(spec), None)
    actor = Stage1Actor(settings)
    run_passes = actor.engine.run_passes

    def fails_after_one_chunk(*args, **kwargs):
        parts = run_passes(*args, **kwargs)
        yield next(parts)
        raise OSError(5, "Input/output error (injected)")

    actor.engine.run_passes = fails_after_one_chunk
    row = decode_group(row, settings.decode)
    index, ok, kind = [], [], []
    for part in actor({k: [v] for k, v in row.items()}):
        for idx, oks, kinds in zip(part["index"], part["ok"], part["error_kind"]):
            index += list(idx)
            ok += list(oks)
            kind += list(kinds)
    assert sorted(index) == list(range(BIG))
    by_index = dict(zip(index, zip(ok, kind)))
    good = [i for i in range(BIG) if i != 17]  # 17 is the corrupt image
    assert [i for i in good if by_index[i][0]] == good[:8]  # the first chunk of 8 readable images came out
    assert all("OSError" in by_index[i][1] for i in good[8:])


def test_every_chunk_has_the_same_column_types(actor_outputs):
    out, _ = actor_outputs["passes"]
    for column in ("image_confidence", "regions_found", "regions_kept", "final"):
        assert len({np.asarray(v).dtype for v in out[column]}) == 1, column


def test_many_groups_make_few_shards_whose_records_add_up(ray_local, tiny_weights, tmp_path):
    root, out = tmp_path / "many", tmp_path / "out"
    groups = {f"{kind}{v}": 2 + v % 3 for v in range(1, 13) for kind in ("horse", "disc")}  # 24 groups of 2-4
    write_sample(str(root), groups)
    images = sum(groups.values())
    per_shard = 20
    manifest = run_inference(config(tiny_weights, root, out, crf="none", rows_per_shard=per_shard, chunk_size=4))
    assert manifest["output"]["rows"] == images and (out / "_SUCCESS").exists()

    shards = sorted((out / "predictions").glob("*.parquet"))
    recs = records(out)
    sizes = sorted(pq.ParquetFile(p).metadata.num_rows for p in shards)
    # at least rows_per_shard rows in each but the last one: a Parquet file per chunk (24+ here) no longer
    assert len(shards) == len(recs) and len(shards) <= -(-images // per_shard), sizes
    assert sum(s < per_shard for s in sizes) <= 1, sizes
    assert {r["shard"] for r in recs} == {f"predictions/{p.name}" for p in shards}
    assert sum(r["rows"] for r in recs) == images

    seen: dict[str, list[int]] = {}
    for r in recs:
        table = pq.read_table(out / r["shard"], columns=["group_key", "index"]).to_pydict()
        held = sorted(zip(table["group_key"], table["index"]))
        said = sorted((key, i) for key, g in r["groups"].items() for i in from_ranges(g["indices"]))
        assert held == said and r["rows"] == len(held)
        for key, g in r["groups"].items():
            assert g["n"] == groups[key] and g["errors"] == {}
            seen.setdefault(key, []).extend(from_ranges(g["indices"]))
    assert {k: sorted(v) for k, v in seen.items()} == {k: list(range(n)) for k, n in groups.items()}
