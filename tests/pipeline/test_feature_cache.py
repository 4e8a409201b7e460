"""The feature-cache pass's figures: what a GPU's cache rate is measured from."""
from __future__ import annotations

import json

import pytest

from conftest import TINY_VIT
from pipeline.feature_cache import BackboneSettings, FeatureActor, busy_seconds
from pipeline.sample import write_sample


@pytest.mark.parametrize("intervals, expected", [
    ([], 0.0),
    ([(1.0, 3.0)], 2.0),
    ([(1.0, 3.0), (5.0, 6.0)], 3.0),  # apart: a stall between them is not counted
    ([(1.0, 4.0), (2.0, 5.0)], 4.0),  # two calls at once count once
    ([(2.0, 5.0), (1.0, 8.0), (3.0, 4.0)], 7.0),  # nested, in any order
    ([(1.0, 2.0), (2.0, 3.0)], 2.0),  # touching
])
def test_busy_seconds_is_the_union_of_the_calls(intervals, expected):
    assert busy_seconds(intervals) == pytest.approx(expected)


def test_a_feature_actor_call_reports_its_times_split_by_step(tiny_weights, tmp_path):
    from pipeline.decode import decode_for_cache

    write_sample(str(tmp_path / "data"), {"horse": 3})
    files = sorted((tmp_path / "data" / "image" / "horse").iterdir())
    row = decode_for_cache({"cache": str(tmp_path / "cache"), "key": "horse", "names": [f.name for f in files],
                            "image_uris": [str(f) for f in files], "sizes": [f.stat().st_size for f in files]}, {})
    empty = {**row, "ok": [False] * len(files)}  # no image decoded: nothing computed, nothing timed
    actor = FeatureActor(BackboneSettings(checkpoint=str(tiny_weights[0]), kwargs=dict(TINY_VIT)))
    out = actor({k: [row[k], empty[k]] for k in row})
    assert out["images"] == [3, 0] and json.loads(out["index"][0])["count"] == 3 and out["index"][1] == "null"
    assert out["backbone_seconds"][0] > 0 and out["write_seconds"][0] > 0
    assert out["backbone_seconds"][1] == out["write_seconds"][1] == 0
    (first_start, second_start), (first_end, second_end) = out["started"], out["ended"]
    assert first_end - first_start >= out["backbone_seconds"][0] + out["write_seconds"][0]
    # one call after the other (ends are measured with the precise clock from the start: a little slack)
    assert first_start < first_end <= second_start + 1e-3 and second_start <= second_end
