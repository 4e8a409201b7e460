"""Exact streaming sums: bit for bit those of math.fsum, whatever the order, the batches and the merges."""
import math

import numpy as np
import pytest

from scosparc_core import metrics
from scosparc_core.metrics import CURVE_POINTS, CURVES, SCALARS, ExactSum, MetricSums, aggregate


def fsum_columns(values: np.ndarray) -> np.ndarray:
    return np.array([math.fsum(values[:, j]) for j in range(values.shape[1])])


def hard_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Columns on which float sums go wrong: cancellation across 1e16..1e-16, halfway ties that need a third
    partial to round right, magnitudes from 1e-300 to 1e300, subnormals, and plain metrics in [0, 1]."""
    cols = [
        rng.choice([1e16, -1e16, 1.0, 1e-16, -1e-16, 3.0], n),
        rng.choice([1.0, 2.0**-53, 2.0**-106, -(2.0**-106), 2.0**-54], n),
        rng.normal(size=n) * 10.0 ** rng.integers(-300, 300, n),
        rng.choice([5e-324, -5e-324, 2.2e-308, 1e-310], n),
        rng.random(n),
        rng.random(n) * 10.0 ** rng.integers(-12, 0, n),
    ]
    return np.column_stack(cols)


def split_sum(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shuffles the rows, cuts them into uneven batches spread over the slots of one accumulator and over a
    second accumulator, then merges everything into one slot."""
    rows = values[rng.permutation(len(values))]
    cuts = np.sort(rng.choice(np.arange(1, len(rows)), size=min(len(rows) - 1, 6), replace=False))
    parts = np.split(rows, cuts)
    many, other = ExactSum(values.shape[1], slots=4), ExactSum(values.shape[1])
    for i, part in enumerate(parts):
        if i % 3 == 2:
            other.add(part)
        else:  # rows of two slots interleaved in one call
            many.add(part, rng.integers(0, 4, len(part)))
    total = ExactSum(values.shape[1])
    total.merge(many, into=0)
    total.merge(other)
    assert total.count[0] == len(values)
    return total.total()[0]


@pytest.mark.parametrize("seed", range(4))
def test_exact_sum_equals_fsum_whatever_the_order_and_split(seed, monkeypatch):
    if seed % 2:  # extraction chunks smaller than a batch, in rows and in slots
        monkeypatch.setattr(metrics, "_CHUNK", 64)
        monkeypatch.setattr(metrics, "_SLOTS", 2)
    rng = np.random.default_rng(seed)
    values = hard_values(rng, 600)
    expected = fsum_columns(values)
    assert not np.array_equal(values.sum(axis=0), expected)  # the data does defeat a plain float sum
    for _ in range(3):
        assert np.array_equal(split_sum(values, rng), expected)


def test_halfway_ties_round_like_fsum():
    cases = [[1.0, 2.0**-53, 2.0**-106], [1.0, 2.0**-53, -(2.0**-106)], [1.0, -(2.0**-54), -(2.0**-107)],
             [1e100, 1.0, -1e100, 1e-100], [2.0**53, 1.0, 2.0**-60], [0.1] * 10]
    for case in cases:
        acc = ExactSum(1)
        for v in case:  # one value per call: the expansion itself, not the extraction, does the work
            acc.add([[v]])
        assert acc.total()[0, 0] == math.fsum(case), case
        assert acc.mean()[0, 0] == math.fsum(case) / len(case)


def test_state_does_not_grow_with_rows():
    rng = np.random.default_rng(0)
    acc = ExactSum(8)
    for _ in range(40):
        acc.add(rng.random((500, 8)) * 10.0 ** rng.integers(-8, 1, (500, 8)))
    assert acc.count[0] == 20_000 and acc.partials <= 4


def test_non_finite_values():
    acc = ExactSum(4)
    acc.add([[1.0, np.inf, np.nan, np.inf], [2.0, 1.0, 1.0, -np.inf]])
    total = acc.total()[0]
    assert total[0] == 3.0 and total[1] == np.inf and np.isnan(total[2]) and np.isnan(total[3])


def metric_rows(rng: np.random.Generator, n: int) -> list[dict]:
    return [{**{k: float(rng.random()) for k in SCALARS},
             **{k: rng.random(CURVE_POINTS) ** rng.uniform(0.5, 4) for k in CURVES}} for _ in range(n)]


def test_metric_sums_in_batches_and_slots_equal_aggregate():
    rng = np.random.default_rng(1)
    rows = metric_rows(rng, 90)
    whole = aggregate(rows)
    for key in SCALARS:  # aggregate is fsum / n, bit for bit
        assert whole[key] == math.fsum(r[key] for r in rows) / len(rows)
    groups = MetricSums(slots=3)
    order = rng.permutation(len(rows))
    for start in range(0, len(rows), 25):
        chosen = [rows[i] for i in order[start : start + 25]]
        groups.add({k: np.array([r[k] for r in chosen]) for k in (*SCALARS, *CURVES)}, rng.integers(0, 3, len(chosen)))
    dataset = MetricSums()
    dataset.merge(groups, into=0)
    streamed = dataset.result()
    assert streamed["images"] == 90
    for key in (*SCALARS, "max_fm", "mean_fm", "max_em", "mean_em"):
        assert streamed[key] == whole[key], key
    for key in CURVES:
        assert np.array_equal(streamed[key], whole[key]), key
    per_slot = groups.results()
    assert per_slot["images"].sum() == 90 and per_slot["fm_curve"].shape == (3, CURVE_POINTS)


def test_nothing_to_aggregate_gives_nan():
    empty = aggregate([])
    assert empty["images"] == 0 and np.isnan(empty["max_fm"]) and np.isnan(empty["fm_curve"]).all()


def test_a_ground_truth_turned_by_90_degrees_is_refused_not_squashed():
    from scosparc_core.metrics import image_metrics

    pred = np.zeros((30, 50), np.uint8)
    pred[5:15, 10:40] = 255
    with pytest.raises(ValueError, match="turned by 90 degrees"):
        image_metrics(pred, np.ascontiguousarray(pred.T))
    assert image_metrics(pred, pred)["mae"] == 0.0
    half = image_metrics(pred, pred[::2, ::2].copy())  # another size: resized, as CoSOD tools do
    assert half["mae"] < 0.05
