"""CoSOD metrics per image, from pysodmetrics, in a form that aggregates exactly.

pysodmetrics accumulates per-image values and curves and averages them at the end. ``image_metrics`` returns
those per-image values (one ``step`` of each pysodmetrics evaluator); ``aggregate`` averages any number of
them into the dataset figures pysodmetrics would report for the same images, whatever order they arrive in.
``MetricSums`` does the same in a stream: fed in batches, merged across workers, in bounded memory, with the
numbers of one ``math.fsum`` pass (``ExactSum``).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import cv2
import numpy as np

CURVE_POINTS = 256  # pysodmetrics' thresholds 0..255
SCALARS = ("mae", "sm", "wfm", "adp_fm", "adp_em")
CURVES = ("precision", "recall", "fm_curve", "em_curve")


def gt_to_mask(gt: np.ndarray, height: int | None = None, width: int | None = None) -> np.ndarray:
    """Any ground-truth array (gray, RGB, RGBA, palette indices already expanded) -> (H, W) uint8 0/255.

    >128 is object, as the paper code binarises ground truth. With a target size that differs, nearest-neighbour
    resize keeps it binary.
    """
    gt = np.asarray(gt)
    if gt.ndim == 3:
        gt = gt[:, :, :3].max(axis=2) if gt.shape[2] >= 3 else gt[:, :, 0]
    if gt.dtype == bool:
        gt = gt.astype(np.uint8) * 255
    elif gt.dtype != np.uint8:  # 16-bit masks: 0..65535
        gt = (gt.astype(np.float64) * (255.0 / 65535.0 if gt.max(initial=0) > 255 else 1.0)).astype(np.uint8)
    mask = np.where(gt > 128, 255, 0).astype(np.uint8)
    if height is not None and width is not None and mask.shape != (height, width):
        mask = cv2.resize(mask, (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
    return mask


def image_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    """pred (H, W) uint8 map and gt (H', W') uint8 0/255 mask -> per-image scalars and 256-point curves.

    A prediction of another size is resized to the ground truth's (bilinear), as CoSOD evaluation tools do; one
    whose size is the ground truth's transposed is refused (ValueError): the mask follows the photo's EXIF
    orientation, and a ground truth drawn on the stored, unturned pixels would be compared squashed.
    """
    if pred.shape != gt.shape and pred.shape == gt.shape[::-1]:
        raise ValueError(f"the ground truth is {gt.shape[1]}x{gt.shape[0]}, the mask {pred.shape[1]}x{pred.shape[0]}: "
                         "turned by 90 degrees (was it drawn on an EXIF-rotated photo's stored pixels?)")
    if pred.shape != gt.shape:
        pred = cv2.resize(pred, (gt.shape[1], gt.shape[0]), interpolation=cv2.INTER_LINEAR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fmeasure announces its future removal on import of the package
        # imported here: modules that only need the constants below (the predictions schema, the report) are
        # loaded by Ray tasks that would otherwise import scikit-learn with it (~2.5 s per worker)
        from py_sod_metrics import MAE, Emeasure, Fmeasure, Smeasure, WeightedFmeasure
        fm, em, sm, wfm, mae = Fmeasure(), Emeasure(), Smeasure(), WeightedFmeasure(), MAE()
    for metric in (fm, em, sm, wfm, mae):
        metric.step(pred=pred, gt=gt)
    return {
        "mae": float(mae.maes[0]),
        "sm": float(sm.sms[0]),
        "wfm": float(wfm.weighted_fms[0]),
        "adp_fm": float(fm.adaptive_fms[0]),
        "adp_em": float(em.adaptive_ems[0]),
        "precision": np.asarray(fm.precisions[0], np.float64),
        "recall": np.asarray(fm.recalls[0], np.float64),
        "fm_curve": np.asarray(fm.changeable_fms[0], np.float64),
        "em_curve": np.asarray(em.changeable_ems[0], np.float64),
    }


WIDTH = len(SCALARS) + CURVE_POINTS * len(CURVES)  # one image's values, as MetricSums packs them
_CHUNK = 4096  # rows per extraction pass: 2**m >= rows + 2 leaves 53 - m = 40 bits captured per level
_SLOTS = 256  # slots per extraction pass


def _two_sum(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Knuth's TwoSum, elementwise: s + err == a + b exactly, s = fl(a + b), whatever the magnitudes."""
    s = a + b
    bv = s - a
    return s, (a - (s - bv)) + (b - bv)


def _level_sums(values: np.ndarray, starts: np.ndarray):
    """Error-free splitting of finite (n, w) rows, sorted into segments beginning at ``starts``, into a few
    (segments, w) levels whose exact sum is each segment's exact column sums.

    Rump, Ogita & Oishi's extraction (SIAM J. Sci. Comput. 31(1), 2008, Lemma 3.3): with sigma = 2**k >=
    2**m * max|x| and 2**m >= n + 2, q = (sigma + x) - sigma and x - q are exact, every q is a multiple of
    2**-53 * sigma and no partial sum of q's exceeds sigma, so sums of q's are exact in any order and over any
    subset (numpy's reductions included). The residues, at most 2**-53 * sigma, go round again with sigma
    scaled by 2**(m - 53), each level taking 53 - m more bits, until nothing is left: two or three levels for
    metrics in [0, 1], bounded by the exponent range in any case.
    """
    n, width = values.shape
    m = (n + 1).bit_length()  # 2**m >= n + 2
    ends = np.r_[starts[1:], n]
    cols = None  # the columns still holding residues (None: all)
    rest, q, owned = values, np.empty_like(values), False
    scale = None  # log2 of each live column's sigma
    while True:
        if scale is None:
            top = np.maximum(rest.max(axis=0), -rest.min(axis=0))
            live = top > 0
            scale = np.frexp(top)[1] + m  # top < 2**exponent
            if scale[live].max(initial=0) > 1023:
                raise OverflowError("values too large for an exact sum (|x| >= 2**1000)")
        else:  # |residue| <= 2**-53 * sigma: the next sigma needs no pass over them, only which are left
            live = rest.any(axis=0)
            scale = np.maximum(scale - 53 + m, -1022)
        if not live.all():
            if not live.any():
                return
            keep = np.flatnonzero(live)
            cols = keep if cols is None else cols[keep]
            rest, scale, owned = rest[:, keep], scale[keep], True
            q = np.empty_like(rest)
        sigma = np.ldexp(1.0, scale)
        np.add(rest, sigma, out=q)
        np.subtract(q, sigma, out=q)
        part = np.stack([q[a:b].sum(axis=0) for a, b in zip(starts, ends)])  # reduceat is ~20x slower
        if cols is None:
            yield part
        else:
            level = np.zeros((len(starts), width))
            level[:, cols] = part
            yield level
        if owned:
            np.subtract(rest, q, out=rest)
        else:
            rest, owned = rest - q, True


def _compact(rows: np.ndarray) -> np.ndarray:
    """Moves the zeros of each column (axis 0) after its non-zero values, keeping their order: a scatter by
    rank (argsort along this short leading axis is ~10x slower)."""
    k = len(rows)
    target = np.empty(rows.shape, np.intp)
    seen = np.zeros(rows.shape[1:], np.intp)
    for j in range(k):  # k is a handful; numpy's cumsum along this axis is slow
        nonzero = rows[j] != 0
        target[j] = np.where(nonzero, seen, k)  # zeros go to the spare row k
        seen += nonzero
    out = np.zeros((k + 1, *rows.shape[1:]))
    np.put_along_axis(out, target, rows, axis=0)
    return out[:-1]


class ExactSum:
    """Exact column sums of float64 rows in ``slots`` independent accumulators, fed in batches, mergeable.

    ``total()[s]`` equals ``math.fsum`` of every value added to slot ``s``, column by column, bit for bit,
    whatever the order of the rows and however they were split into batches or over workers; ``mean()`` is that
    sum over the slot's row count, as ``math.fsum(values) / len(values)``. Slots let one object hold many groups
    at once, vectorised across them (``add(values, slots=...)``).

    State: Shewchuk's non-overlapping partials (those of fsum), as (partials, slots, width) float64 with
    partials 2-4 for metrics in [0, 1] (at most ~40 for any doubles) whatever the number of rows. A batch is
    split error-free into a few levels (``_level_sums``, vectorised over rows, columns and slots), each grown into
    the partials (Grow-Expansion with TwoSum); the final rounding is CPython's fsum tail, column-wise.
    Hand-written: numpy's sums are not exact, ``math.fsum`` is exact but one column at a time with every value
    at hand, and no maintained library offers an exact, mergeable, vectorised accumulator.
    Non-finite values: any NaN, or +inf with -inf, gives NaN (where fsum raises); a lone inf gives inf.
    """

    def __init__(self, width: int, slots: int = 1):
        self.width = int(width)
        self.count = np.zeros(slots, np.int64)
        # per slot and column: the non-zero partials first, in increasing magnitude, non-overlapping; then zeros
        self._partials = np.zeros((0, slots, self.width))
        self._special = np.zeros((slots, self.width))  # plain sum of the non-finite values (inf/nan commute)

    @property
    def slots(self) -> int:
        return len(self.count)

    @property
    def partials(self) -> int:
        """Rows of partials held: the state is (partials, slots, width) float64."""
        return len(self._partials)

    def resize(self, slots: int) -> None:
        """More slots (new ones empty); never fewer."""
        extra = slots - self.slots
        if extra > 0:
            self.count = np.concatenate([self.count, np.zeros(extra, np.int64)])
            self._partials = np.concatenate([self._partials, np.zeros((self.partials, extra, self.width))], 1)
            self._special = np.concatenate([self._special, np.zeros((extra, self.width))])

    def reset(self, slots) -> None:
        """Empties the given slots (for reuse)."""
        slots = np.asarray(slots, np.intp)
        self.count[slots] = 0
        self._partials[:, slots] = 0.0
        self._special[slots] = 0.0
        used = (self._partials != 0).reshape(self.partials, -1).any(axis=1)
        self._partials = self._partials[: int(used.sum())]

    def add(self, values, slots=None) -> None:
        """values: (n, width) float64 rows; slots: (n,) ints in [0, self.slots) or None for slot 0."""
        values = np.asarray(values, np.float64).reshape(-1, self.width)
        slots = np.zeros(len(values), np.intp) if slots is None else np.asarray(slots, np.intp)
        np.add.at(self.count, slots, 1)
        self._add(values, slots)

    def merge(self, other: "ExactSum", slots=None, into=None) -> None:
        """Adds ``other``'s ``slots`` (default: all) into this one's ``into`` (default: the same indices)."""
        if other.width != self.width:
            raise ValueError(f"cannot merge an ExactSum of width {other.width} into one of width {self.width}")
        slots = np.arange(other.slots) if slots is None else np.asarray(slots, np.intp)
        into = slots if into is None else np.broadcast_to(np.asarray(into, np.intp), slots.shape)
        np.add.at(self.count, into, other.count[slots])
        with np.errstate(invalid="ignore"):
            np.add.at(self._special, into, other._special[slots])
        rows = other._partials[:, slots].reshape(-1, self.width)  # partial k of slot j -> into[j]
        self._add(rows, np.tile(into, other.partials))

    def _add(self, values: np.ndarray, slots: np.ndarray) -> None:
        if not len(values):
            return
        with np.errstate(over="ignore"):
            check = np.add.reduce(values, axis=None)  # one pass: NaN/inf (or a harmless overflow) show here
        if not np.isfinite(check):
            finite = np.isfinite(values)
            bad = ~finite.all(axis=1)
            with np.errstate(invalid="ignore"):  # inf - inf is meant to give NaN here
                np.add.at(self._special, slots[bad], np.where(finite[bad], 0.0, values[bad]))
            values = np.where(finite, values, 0.0)
        runs = 1 + int(np.count_nonzero(slots[1:] != slots[:-1]))
        if runs > 1 and runs != len(np.unique(slots)):  # each slot's rows must be one run; usually they are
            order = np.argsort(slots, kind="stable")
            values, slots = values[order], slots[order]
        # chunks of at most _CHUNK rows and _SLOTS slots (a grow copies partials x slots x width)
        runs = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        bounds = sorted({*range(0, len(values), _CHUNK), *runs[::_SLOTS].tolist(), len(values)})
        for start, stop in zip(bounds[:-1], bounds[1:]):
            chunk_slots = slots[start:stop]
            starts = np.flatnonzero(np.r_[True, chunk_slots[1:] != chunk_slots[:-1]])
            for level in _level_sums(values[start:stop], starts):
                self._grow(level, chunk_slots[starts])

    def _grow(self, terms: np.ndarray, targets: np.ndarray) -> None:
        """Shewchuk's Grow-Expansion with TwoSum: terms (b, width) into slots ``targets`` (b distinct)."""
        x, rows = terms, []
        for p in self._partials[:, targets]:  # increasing magnitude; trailing zeros pass x through unchanged
            x, lo = _two_sum(x, p)
            rows.append(lo)
        rows.append(x)
        stacked = _compact(np.array(rows))
        if stacked[-1].any():
            self._partials = np.concatenate([self._partials, np.zeros((1, self.slots, self.width))])
            self._partials[:, targets] = stacked
        else:
            self._partials[:, targets] = stacked[:-1]

    def total(self, slots=None) -> np.ndarray:
        """(len(slots), width) correctly rounded sums (default: all slots): CPython's fsum tail, vectorised."""
        slots = np.arange(self.slots) if slots is None else np.asarray(slots, np.intp)
        p = self._partials[:, slots]
        k = len(p)
        hi = np.zeros((len(slots), self.width))
        if k:
            # p[k-1] is a column's largest partial only where it has k of them; in the others the loop passes
            # over the trailing zeros exactly (adding 0 leaves lo == 0) and goes on from the largest.
            hi = p[k - 1].copy()
            lo = np.zeros_like(hi)
            below = np.zeros_like(hi)  # the partial under the one where the sum became inexact
            open_ = np.ones(hi.shape, bool)
            for j in range(k - 2, -1, -1):
                h = hi + p[j]
                low = p[j] - (h - hi)
                hi = np.where(open_, h, hi)
                lo = np.where(open_, low, lo)
                broke = open_ & (low != 0)
                if j > 0:
                    below = np.where(broke, p[j - 1], below)
                open_ &= ~broke
            # half-even rounding across partials, as fsum does
            tie = ((lo < 0) & (below < 0)) | ((lo > 0) & (below > 0))
            y = lo * 2
            x = hi + y
            hi = np.where(tie & (y == x - hi), x, hi)
        special = self._special[slots]
        return np.where(special != 0, special, hi)

    def mean(self, slots=None) -> np.ndarray:
        """(len(slots), width) total / count; NaN for a slot with no rows."""
        slots = np.arange(self.slots) if slots is None else np.asarray(slots, np.intp)
        count = self.count[slots]
        with np.errstate(invalid="ignore", divide="ignore"):
            out = self.total(slots) / count[:, None]
        out[count == 0] = np.nan
        return out


class MetricSums:
    """Streaming form of ``aggregate``: exact running sums of per-image metrics in ``slots`` accumulators
    (a dataset, or many groups at once), fed in batches, mergeable across workers and from group to dataset.

    State: ``ExactSum`` over the SCALARS and the four 256-point CURVES, (partials, slots, 1029) float64, about
    25 KiB per slot with the usual 3 partials, whatever the number of images.
    """

    def __init__(self, slots: int = 1):
        self.sums = ExactSum(WIDTH, slots)

    @property
    def images(self) -> np.ndarray:
        """(slots,) images added to each slot."""
        return self.sums.count

    @staticmethod
    def pack(columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """{scalar: (n,), curve: (n, 256)} -> (n, WIDTH) rows as ``add_packed`` takes them."""
        n = len(np.asarray(columns[SCALARS[0]]))
        out = np.empty((n, WIDTH))
        out[:, : len(SCALARS)] = np.column_stack([np.asarray(columns[k], np.float64) for k in SCALARS])
        for j, key in enumerate(CURVES):
            start = len(SCALARS) + j * CURVE_POINTS
            out[:, start : start + CURVE_POINTS] = np.asarray(columns[key], np.float64).reshape(n, CURVE_POINTS)
        return out

    def add(self, columns: Mapping[str, np.ndarray], slots=None) -> None:
        """Adds n images: each scalar (n,), each curve (n, 256); slots (n,) or None for slot 0."""
        self.add_packed(self.pack(columns), slots)

    def add_packed(self, rows: np.ndarray, slots=None) -> None:
        self.sums.add(rows, slots)

    def add_rows(self, rows: Iterable[Mapping], slot: int = 0) -> None:
        """Adds per-image dicts as ``image_metrics`` returns them."""
        rows = list(rows)
        if rows:
            columns = {k: np.array([np.asarray(r[k], np.float64) for r in rows]) for k in (*SCALARS, *CURVES)}
            self.add(columns, np.full(len(rows), slot))

    def merge(self, other: "MetricSums", slots=None, into=None) -> None:
        self.sums.merge(other.sums, slots, into)

    def resize(self, slots: int) -> None:
        self.sums.resize(slots)

    def reset(self, slots) -> None:
        self.sums.reset(slots)

    def results(self, slots=None) -> dict:
        """The figures ``aggregate`` gives, for each slot: {"images": (b,), scalar: (b,), curve: (b, 256),
        "max_fm"/"mean_fm"/"max_em"/"mean_em": (b,)}."""
        slots = np.arange(self.sums.slots) if slots is None else np.asarray(slots, np.intp)
        means = self.sums.mean(slots)
        out: dict = {"images": self.images[slots].copy()}
        for i, key in enumerate(SCALARS):
            out[key] = means[:, i]
        for j, key in enumerate(CURVES):
            start = len(SCALARS) + j * CURVE_POINTS
            out[key] = means[:, start : start + CURVE_POINTS]
        for curve, stem in (("fm_curve", "fm"), ("em_curve", "em")):
            out[f"max_{stem}"] = np.max(out[curve], axis=1)
            out[f"mean_{stem}"] = np.mean(out[curve], axis=1)
        return out

    def result(self, slot: int = 0) -> dict:
        """One slot's figures, as ``aggregate`` returns them (floats and (256,) curves)."""
        one = self.results([slot])
        return {k: (int(v[0]) if k == "images" else v[0] if v.ndim > 1 else float(v[0])) for k, v in one.items()}


def aggregate(rows: Iterable[Mapping]) -> dict:
    """Per-image metric rows -> dataset metrics: max/mean/adaptive F, S, max/mean/adaptive E, MAE, weighted F,
    and the mean curves (256,) per threshold. Sums are exact (those of math.fsum), so any split of the rows
    across workers gives the same numbers; ``MetricSums`` is the same computation fed in batches."""
    sums = MetricSums()
    sums.add_rows(rows)
    return sums.result()
