"""Header-free statistics of a slice's values in modality units: what per-image scaling throws away.

Percentile (or min/max) scaling makes every slice span the same grey range, which is what lets one network read
JPEG radiographs and 16-bit DICOM alike, but it discards the one property that is physically fixed across
sites: the values themselves. A CT slice is in Hounsfield units (air at -1000, water at 0), a PET slice in
activity concentration (non-integer after its rescale slope, a long bright tail), an MR slice in arbitrary
non-negative integers, an 8-bit radiograph in 0..255. None of this needs the header's Modality tag: the
values come out of the modality LUT (RescaleSlope/Intercept) as part of decoding. The decoded matrix size is
the other fixed property (radiographs run to thousands of pixels a side, PET to a few hundred), so its log2
is recorded too, and so is how far the stored integers reach before the rescale (``log2_stored_peak``) with
the non-integer fraction where they fill the upper half of the signed 16-bit range: how PET reconstructions
are commonly stored (every PET slice of the shared corpus, three sites and two formats; see
:func:`value_features`).

Measured on the shared real corpus (docs/results.md, follow-up 3): a small MLP on these statistics alone,
leave-one-source-out over the 25 sources, scored balanced accuracy 0.905 without the matrix size and 0.95
with it, where the 64-px CNN on percentile-scaled pixels scores about 0.7 on unseen sources. The classifier
fuses both (see :class:`modality.models.value_head.ValueStatsHead`).

Each feature is computed on a regular grid subsample of at most :data:`SAMPLE_LIMIT` pixels (~0.1 ms a
slice); values are squashed with ``asinh(v / 100)`` so HU, MR integers and PET activities
of 1e5 all land in a small range without a log's trouble at zero and below.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

#: Names of the features, in order (recorded in each shard sample's JSON as ``value_features``).
VALUE_FEATURES = (
    "fraction_at_or_below_-500",
    "fraction_within_150_of_0",
    "asinh_p0.5",
    "asinh_p5",
    "asinh_p50",
    "asinh_p95",
    "asinh_p99.5",
    "asinh_max",
    "fraction_non_integer",
    "log2_rows",
    "log2_columns",
    "log2_stored_peak",
    "non_integer_at_int16_peak",
)
_PERCENTILES = (0.5, 5.0, 50.0, 95.0, 99.5)
#: Grid subsample size: 4096 values (every 8th row and column of a 512x512 slice) are plenty for a classifier
#: feature, and keep the cost near 0.1 ms per slice.
SAMPLE_LIMIT = 1 << 12


def _squash(value: float) -> float:
    return math.asinh(value / 100.0)


def _sorted_percentile(values: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (its default "linear" method, same rounding) of an already sorted array."""
    position = q / 100.0 * (values.size - 1)
    below = math.floor(position)
    above = min(below + 1, values.size - 1)
    low, high, t = float(values[below]), float(values[above]), position - below
    return high - (high - low) * (1.0 - t) if t >= 0.5 else low + (high - low) * t


#: ``stored_peak`` at or above this reaches the upper half of the signed 16-bit range (2 ** 14).
INT16_UPPER_HALF = 1 << 14


def value_features(pixels: np.ndarray, stored_peak: int | None = None) -> list[float]:
    """The :data:`VALUE_FEATURES` of one slice in modality units (non-finite values ignored).

    ``stored_peak`` is the largest stored integer magnitude before the rescale (the readers'
    ``meta["stored_peak"]``; None for float data, which then reads as 0). Why it is here: PET
    reconstructions are commonly stored with a scale factor chosen so that the stored integers fill the signed
    16-bit range (every PET slice of the shared corpus, three sites and two formats: stored peak 32,765-32,768), while their
    values in activity units are non-integer; CT, MR and radiographs store 8-16 bit detector or signal
    integers that rarely reach 2 ** 14, and MR that does is stored without a fractional slope. The pair
    holds across PET sites where the activity values themselves do not (whole-body Bq/ml against
    spatially normalised brain volumes differ by orders of magnitude).

    Raises ``ValueError`` for a slice with no finite value (prepare rejects those before asking).
    """
    arr = np.asarray(pixels)
    rows, columns = (arr.shape[0], arr.shape[1]) if arr.ndim >= 2 else (1, arr.size)
    if arr.ndim == 2 and arr.size > SAMPLE_LIMIT:
        step = math.ceil(math.sqrt(arr.size / SAMPLE_LIMIT))
        arr = arr[::step, ::step]
    # One sort serves everything: percentiles are indexed, fractions are binary searches, and non-finite
    # values sort to the ends (-inf first; +inf, then NaN, last). About 3x cheaper than np.percentile plus
    # a mean per fraction, which matters because prepare calls this for every slice. float32 pixels (every
    # reader's) are sorted as they are: widening them to float64 first changes no value and no comparison
    # below (each difference from the nearest integer is exact in float32), it only doubled the sort.
    wide = arr.dtype != np.float32
    values = np.sort(np.asarray(arr, dtype=np.float64) if wide else arr, axis=None)
    below_inf, at_most_minus_500, at_most_minus_150 = np.searchsorted(values, _RIGHT_EDGES, "right")
    below_150, below_plus_inf = np.searchsorted(values, _LEFT_EDGES, "left")
    values = values[below_inf:below_plus_inf]
    n = values.size
    if n == 0:
        raise ValueError("no finite pixel values")
    non_integer = float(np.count_nonzero(np.abs(values - np.round(values)) > _NON_INTEGER)) / n
    peak = max(int(stored_peak), 0) if stored_peak is not None else 0
    return [
        float(at_most_minus_500 - below_inf) / n,
        float(below_150 - at_most_minus_150) / n,
        *(_squash(_sorted_percentile(values, q)) for q in _PERCENTILES),
        _squash(float(values[-1])),
        non_integer,
        math.log2(max(rows, 1)),
        math.log2(max(columns, 1)),
        math.log2(peak + 1),
        non_integer if peak >= INT16_UPPER_HALF else 0.0,
    ]


#: The statistics a slice stored as floating point has (NIfTI float32, DICOM Float Pixel Data): no stored
#: integers, so no stored peak. The two stored-peak statistics are the last two of :data:`VALUE_FEATURES`,
#: so these are its leading columns and every column index below means the same in both.
FLOAT_FEATURES = VALUE_FEATURES[: VALUE_FEATURES.index("log2_stored_peak")]
assert VALUE_FEATURES[len(FLOAT_FEATURES) :] == ("log2_stored_peak", "non_integer_at_int16_peak")


def float_head_inputs(features: np.ndarray) -> np.ndarray:
    """What the float head reads of ``features`` (N, len(VALUE_FEATURES) or more): the :data:`FLOAT_FEATURES`
    columns with ``fraction_non_integer`` set to 0. Why not that one either: stored as floats, whether values
    are integers says how the volume was scaled on export, not what the scanner measured (MR written with a
    fractional scale reads as non-integer, and the head had learned "non-integer means PET": three of four
    float MR volumes were called PET before this)."""
    columns = np.array(np.asarray(features, dtype=np.float32)[:, : len(FLOAT_FEATURES)])
    columns[:, VALUE_FEATURES.index("fraction_non_integer")] = 0.0
    return columns


def stored_as_float(features: np.ndarray) -> np.ndarray:
    """Rows of ``features`` (N, len(VALUE_FEATURES)) whose slice had no stored integers: ``stored_peak`` None
    reads as log2(0 + 1) = 0, which no integer slice gives (its peak is at least 1: all-zero slices are
    rejected as blank)."""
    features = np.asarray(features)
    return features[:, VALUE_FEATURES.index("log2_stored_peak")] == 0


#: Search points of :func:`value_features` (exact in float32 and float64 alike).
_RIGHT_EDGES = np.array([-np.inf, -500.0, -150.0])
_LEFT_EDGES = np.array([150.0, np.inf])
#: A float64 scalar, so the comparison runs in float64 whatever the values' dtype.
_NON_INTEGER = np.float64(1e-3)


#: Training copies of every sample as if its image had been exported 2x, 4x and 8x smaller: public collections
#: are often shared downsampled (CheXpert's "small" JPEGs, MedNIST's 64-pixel tiles), never upsampled.
#: Measured leave-one-source-out on the shared corpus (scripts/value_head_loso.py): the head alone scores
#: 0.950 without these copies and 0.941 with them, but on held-out sources shrunk 2x / 4x / 8x 0.909 / 0.815
#: / 0.701 without and 0.950 / 0.948 / 0.941 with: a large matrix still says "radiograph", a small one no
#: longer says "not a radiograph".
SMALLER_EXPORT_STEPS = (1, 2, 3)
#: Sizes are never shrunk below 32 pixels a side (2 ** 5), nor below what they were.
SMALLEST_EXPORT_LOG2 = 5.0


def with_smaller_exports(
    features: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``features`` (N, len(VALUE_FEATURES)) and ``labels`` plus one shrunk copy per
    :data:`SMALLER_EXPORT_STEPS`: log2 rows and columns lowered by the step (the value statistics stay, as
    an antialiased resize barely moves them). The third array is each row's origin, its index in the input:
    what carries a sample's source (and so its weight) to its copies."""
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    copies, copy_labels = [features], [labels]
    for step in SMALLER_EXPORT_STEPS:
        shrunk = features.copy()
        for name in ("log2_rows", "log2_columns"):
            column = VALUE_FEATURES.index(name)
            floor = np.minimum(shrunk[:, column], SMALLEST_EXPORT_LOG2)
            shrunk[:, column] = np.maximum(shrunk[:, column] - step, floor)
        copies.append(shrunk)
        copy_labels.append(labels)
    origin = np.tile(np.arange(len(features)), 1 + len(SMALLER_EXPORT_STEPS))
    return np.concatenate(copies), np.concatenate(copy_labels), origin


#: Classes whose values have no fixed unit across sites: MR signal is in arbitrary units, PET activity in
#: Bq/ml, kBq/ml, SUV or scanner counts. CT's Hounsfield units are absolute, so CT is left as recorded.
UNIT_FREE_CLASSES = ("MR", "PT")
#: Value columns that scale with the unit: the squashed percentiles and maximum.
_UNIT_COLUMNS = tuple(VALUE_FEATURES.index(n) for n in VALUE_FEATURES if n.startswith("asinh_"))
#: Unit-rescaled training copies per sample of a unit-free class, each with its own factor
#: ``10 ** U(-UNIT_DECADES, UNIT_DECADES)``.
UNIT_COPIES = 3
UNIT_DECADES = 1.5


def with_unit_rescaled(
    features: np.ndarray, labels: np.ndarray, unit_free: Sequence[int], *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``features`` and ``labels`` plus :data:`UNIT_COPIES` copies of every sample whose label is in
    ``unit_free``, its value percentiles and maximum as if its values were in a unit 10 ** +-1.5 times
    larger or smaller (deterministic for a seed); the third array is each row's origin, its index in the input.

    Why: with one or two sites per class, the head otherwise learns each site's unit (a whole-body PET in
    Bq/ml, brain PET volumes in their own scale) instead of what holds across sites. Measured alone
    (value head, leave one source group out over the 14 groups with DICOM/volume slices,
    scripts/value_head_loso.py): PET recall 0.116 before, 0.488 with the stored-peak statistics, 0.999 with
    these copies too; CT and MR unchanged. Designed after seeing the PET folds fail; chosen inside the training
    folds it is not picked in the two PET folds (docs/results.md). The fractions of values near 0 and at -500
    cannot be recomputed from the statistics and stay as recorded.
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels)
    rows = np.isin(labels, np.asarray(list(unit_free), dtype=labels.dtype))
    if not rows.any():
        return features, labels, np.arange(len(features))
    rng = np.random.default_rng(seed)
    columns = list(_UNIT_COLUMNS)
    copies, copy_labels = [features], [labels]
    for _ in range(UNIT_COPIES):
        copy = features[rows].copy()
        factor = 10.0 ** rng.uniform(-UNIT_DECADES, UNIT_DECADES, size=(len(copy), 1))
        values = 100.0 * np.sinh(copy[:, columns].astype(np.float64))
        copy[:, columns] = np.arcsinh(values * factor / 100.0).astype(np.float32)
        copies.append(copy)
        copy_labels.append(labels[rows])
    origin = np.concatenate([np.arange(len(features)), *[np.flatnonzero(rows)] * UNIT_COPIES])
    return np.concatenate(copies), np.concatenate(copy_labels), origin


#: The class whose 8-bit exports :func:`as_detector_radiographs` turns into DICOM-like rows.
RADIOGRAPH_CLASS = "XR"
#: log2 of the largest stored value the copies get, drawn uniformly per copy: 10-12 bits, what DICOM
#: radiographs commonly store (the shared corpus's 12 DICOM radiographs peak at 2^9.8 .. 2^14.7). A first
#: range of 10-14 bits was narrowed after it moved brain PET to X-ray under leave one group out (docs/results.md).
DETECTOR_PEAK_BITS = (10.0, 12.0)


def as_detector_radiographs(features: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Rows of 8-bit radiograph exports (PNG/JPEG, N x len(VALUE_FEATURES)) as if the same images were DICOM
    radiographs: their display values scaled to detector integers whose peak is 2 ** U(DETECTOR_PEAK_BITS)
    (deterministic for a seed), the stored peak that gives, integers (no non-integer fraction), nothing at
    or below -500, and the fraction within 150 of 0 read off the scaled percentiles (piecewise-linear
    between 0 and p0.5 .. p99.5, an estimate). The matrix size stays as it was.

    Why: the value head answers only slices with physical units, and the only radiographs it can learn from
    are the few DICOM ones (12 slices in the shared corpus, all in one linked source group), so under leave
    one group out it called every held-out DICOM radiograph MR (12 of 12), and so did the fused decision,
    even where the CNN said X-ray at 0.99. Radiographs are common as DICOM in public pools. The 8-bit
    exports carry the shape of a radiograph's value distribution and its matrix size; the scale is what
    differs, and that is what these copies vary.
    """
    rows = np.asarray(features, dtype=np.float64)
    out = rows.copy()
    if not len(rows):
        return out.astype(np.float32)
    first, last = VALUE_FEATURES.index("asinh_p0.5"), VALUE_FEATURES.index("asinh_max") + 1
    values = 100.0 * np.sinh(rows[:, first:last])  # p0.5, p5, p50, p95, p99.5, max in display units
    peak = np.maximum(values[:, -1], 1.0)
    bits = np.random.default_rng(seed).uniform(*DETECTOR_PEAK_BITS, size=len(rows))
    values = np.maximum(values, 0.0) * ((2.0**bits - 1.0) / peak)[:, None]
    out[:, first:last] = np.arcsinh(values / 100.0)
    levels = np.array([0.0, *(q / 100.0 for q in _PERCENTILES)])
    for row, scaled in zip(out, values, strict=True):
        points = np.concatenate(([0.0], np.maximum.accumulate(scaled[:-1])))
        row[VALUE_FEATURES.index("fraction_within_150_of_0")] = float(
            np.interp(150.0, points, levels, right=1.0)
        )
    out[:, VALUE_FEATURES.index("fraction_at_or_below_-500")] = 0.0
    out[:, VALUE_FEATURES.index("fraction_non_integer")] = 0.0
    out[:, VALUE_FEATURES.index("log2_stored_peak")] = np.log2(values[:, -1] + 1.0)
    out[:, VALUE_FEATURES.index("non_integer_at_int16_peak")] = 0.0
    return out.astype(np.float32)
