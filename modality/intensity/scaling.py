"""Intensity scaling: pixels in modality units -> float32 in [0, 1].

Each method is a small pure function. They share two rules:

* non-finite values (NaN/inf from NIfTI volumes) never poison the statistics; they come out as 0;
* a range of zero width (a constant image, a degenerate window) yields zeros instead of dividing by zero,
  because a blank slice is background, not an error.

Each strategy is also a frozen dataclass (:class:`PercentileScaling`, :class:`MinMaxScaling`,
:class:`DtypeScaling`, :class:`WindowScaling`): its parameters are checked once, when it is built (by Hydra from
``configs/scaling/*.yaml``'s ``_target_``, or by :meth:`Scaling.from_dict` from a stored ``summary.json`` or
checkpoint), and calling it on a decoded slice applies its pure function. ``to_dict`` is the stored form,
``{"method": <name>, <parameters>}``, unchanged from the string-dispatched dicts earlier prepare runs stored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from numbers import Real
from typing import Any, ClassVar

import numpy as np

from modality.records import DecodedSlice

#: Default percentiles: robust to the few hot pixels (burned-in text, metal) that make min/max useless.
DEFAULT_LOW_PERCENTILE = 0.5
DEFAULT_HIGH_PERCENTILE = 99.5

# Radiograph codes share the XR window entry, so a window config keyed by class also matches a header code.
_CODE_ALIASES = {"CR": "XR", "DX": "XR", "MG": "XR", "RG": "XR"}


def _as_float32(pixels: np.ndarray) -> np.ndarray:
    return np.asarray(pixels, dtype=np.float32)


def scale_to_range(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` linearly onto ``[0, 1]`` and clip; zeros when ``high <= low``."""
    arr = _as_float32(pixels)
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        return np.zeros(arr.shape, dtype=np.float32)
    out = arr - np.float32(low)
    out *= np.float32(1.0 / (float(high) - float(low)))
    np.clip(out, 0.0, 1.0, out=out)  # +-inf land on 0 / 1
    if np.isnan(out.max()):  # NaN survives clip and propagates through max: a reduction, no mask array
        # Background is the only safe guess for a pixel with no value.
        np.nan_to_num(out, nan=0.0, posinf=1.0, neginf=0.0, copy=False)
    return out


#: Above this many pixels, percentiles are estimated on a regular grid subsample: every slice pays for
#: them, and a full partition costs ~3 ms for 512x512 and ~120 ms for a 3000x2500 radiograph. A 2-D grid of
#: >= 2**16 samples moves the scaled image by at most about one uint8 step (max 1.1 over 120 real slices).
PERCENTILE_SAMPLE_LIMIT = 1 << 16


def _finite_values(pixels: np.ndarray) -> np.ndarray:
    """The finite values, without copying in the (usual) case where all are finite."""
    flat = _as_float32(pixels).ravel()
    finite = np.isfinite(flat)
    return flat if finite.all() else flat[finite]


def _grid_sample(pixels: np.ndarray, limit: int = PERCENTILE_SAMPLE_LIMIT) -> np.ndarray:
    """A regular 2-D grid subsample of at most ~``limit`` pixels (deterministic, spatially uniform)."""
    arr = _as_float32(pixels)
    if arr.size <= limit or arr.ndim != 2:
        return arr
    step = int(np.ceil(np.sqrt(arr.size / limit)))
    return arr[::step, ::step]


#: Below this many values, order statistics come from one plain ``np.partition``: up to ~110 x 110 values it
#: is faster than the tail selection's dozen numpy calls (7 against 18 us for a 64 x 64 slice).
_TAIL_SELECT_MIN = 12288
#: Stride of the subsample that bounds each tail; and the head-room factor on the tail size it aims for.
_TAIL_STRIDE = 16
_TAIL_MARGIN = 1.5


def _tail_statistics(
    flat: np.ndarray, ks: Sequence[int], bound: np.floating, upper: bool
) -> dict[int, float] | None:
    """The order statistics ``ks`` (all in one tail) given a value ``bound`` from that tail, or None when
    fewer than ``max(ks) + 1`` values reach it, counted from the low end (from the high end when
    ``upper``); the caller then falls back to a full partition.

    Exactness: if ``c`` values are at or beyond ``bound``, they are the ``c`` most extreme (ties
    included), so each requested rank below ``c`` is found among them. When ties with ``bound`` make them
    many (a slice whose background fills its low tail: an MR at 0 left a third of its values to
    partition), only the values strictly beyond ``bound`` are partitioned, and the ranks that fall on
    the ties are ``bound`` itself.
    """
    n = flat.size
    ranks = {k: n - 1 - k if upper else k for k in ks}  # 0 = the most extreme value of the tail
    deepest = max(ranks.values())
    tail = flat[flat >= bound] if upper else flat[flat <= bound]
    if tail.size <= deepest:
        return None
    found: dict[int, float] = {}
    if tail.size > 4 * (deepest + 1) + 64:
        tail = tail[tail > bound] if upper else tail[tail < bound]
        found = {k: float(bound) for k, r in ranks.items() if r >= tail.size}
        ranks = {k: r for k, r in ranks.items() if r < tail.size}
    if ranks:
        last = tail.size - 1
        positions = {k: last - r if upper else r for k, r in ranks.items()}
        part = np.partition(tail, sorted(set(positions.values())))
        found.update({k: float(part[p]) for k, p in positions.items()})
    return found


def order_statistics(values: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Exact k-th smallest values (0-based ``ks``) of a 1-D array, the same as ``np.partition`` gives.

    Percentiles near the ends need only the two tails: one selection on a 1/16 strided subsample gives a
    value inside each tail, each tail is cut out with one comparison and partitioned alone (0.04 instead
    of 1.2 ms for 65,536 values). Tails the subsample misjudges fall back to the full partition.
    """
    flat = np.ravel(values)
    n = flat.size
    found: dict[int, float] = {}
    if n >= _TAIL_SELECT_MIN:
        low_ks = sorted(k for k in ks if k < n // 2)
        high_ks = sorted(k for k in ks if k >= n // 2)
        sub = flat[::_TAIL_STRIDE]
        last = sub.size - 1
        picks: dict[str, int] = {}
        if low_ks:
            picks["low"] = min(last, int((low_ks[-1] + 1) / _TAIL_STRIDE * _TAIL_MARGIN) + 8)
        if high_ks:
            picks["high"] = last - min(last, int((n - high_ks[0]) / _TAIL_STRIDE * _TAIL_MARGIN) + 8)
        selected = np.partition(sub, sorted(set(picks.values())))  # one selection for both bounds
        if low_ks:
            found.update(_tail_statistics(flat, low_ks, selected[picks["low"]], upper=False) or {})
        if high_ks:
            found.update(_tail_statistics(flat, high_ks, selected[picks["high"]], upper=True) or {})
    missing = sorted({int(k) for k in ks} - set(found))
    if missing:
        part = np.partition(flat, missing)
        found.update({k: float(part[k]) for k in missing})
    return found


def percentiles(values: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Two percentiles (numpy's default "linear" definition) from four exact order statistics.

    ``np.percentile`` partitions for every quantile separately and copies; :func:`order_statistics`
    selects only the order statistics needed, in the two tails, which matters because this runs on every
    slice.
    """
    flat = np.ravel(values)
    n = flat.size
    positions = [low / 100.0 * (n - 1), high / 100.0 * (n - 1)]
    floors = [int(np.floor(p)) for p in positions]
    kth = sorted({k for f in floors for k in (f, min(f + 1, n - 1))})
    stats = order_statistics(flat, kth)
    result = []
    for position, f in zip(positions, floors, strict=True):
        frac = position - f
        lower, upper = stats[f], stats[min(f + 1, n - 1)]
        result.append(lower + (upper - lower) * frac)
    return result[0], result[1]


def scale_by_dtype(pixels: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """The reference study's method, done right: divide by the range the *stored bits* can express.

    ``value_range`` must come from BitsStored/PixelRepresentation through the modality LUT (the reader's
    ``DecodedSlice.value_range``), not from the numpy dtype: a 12-bit CT in an int16 array spans
    [-2048, 2047] (-> [-3072, 1023] HU after the intercept), not [-32768, 32767], and the reference's
    dtype-range division is what pushed most of its images to near zero.
    """
    low, high = value_range
    return scale_to_range(pixels, float(low), float(high))


def scale_minmax(pixels: np.ndarray) -> np.ndarray:
    """Per-image min/max to [0, 1]; sensitive to single outlier pixels (use percentile for robustness)."""
    values = _finite_values(pixels)
    if values.size == 0:
        return np.zeros(np.shape(pixels), dtype=np.float32)
    return scale_to_range(pixels, float(values.min()), float(values.max()))


def floor_above_padding(values: np.ndarray, p_low: float, p_high: float, gap: float) -> float:
    """The low end of the stretch when the darkest values are undeclared padding: ``p_low`` otherwise.

    Many CT scanners store the corners outside the reconstruction circle as -2048 or -3024 HU without
    declaring PixelPaddingValue (half of the shared corpus's CT slices, none of its MR, PET or radiographs).
    That plateau (a fifth of a 512x512 slice) is then the low percentile, and air, 1,000-2,000 HU above it,
    comes out mid-grey instead of black: whether air is black in the picture depends on the vendor, which is
    exactly what differs at a site the model has never seen. When the low percentile sits on the minimum and
    the next value up is at least ``gap`` of the way from the minimum to ``p_high``, the minimum is treated
    as declared padding is by the DICOM reader (set to the darkest real pixel): the stretch starts at that
    darkest real pixel. An MR's or PET's zero background is followed by small values (gaps under 0.15 of the
    range in the corpus), so 0.2 leaves them alone. ``gap <= 0`` turns it off.
    """
    if gap <= 0 or p_high <= p_low:
        return p_low
    floor = float(values.min())
    if p_low > floor:
        return p_low
    above = values[values > floor]
    if above.size == 0:
        return p_low
    darkest = float(above.min())
    if darkest < p_high and darkest - floor >= gap * (p_high - floor):
        return darkest
    return p_low


def scale_percentile(
    pixels: np.ndarray,
    low: float = DEFAULT_LOW_PERCENTILE,
    high: float = DEFAULT_HIGH_PERCENTILE,
    padding_gap: float = 0.0,
) -> np.ndarray:
    """Per-image percentiles ``low``/``high`` (in percent) to [0, 1]: the default method.

    Falls back to min/max when the percentiles coincide but the image is not constant (mostly-background
    slices where > 99% of pixels share one value), so the little anatomy there is not erased. With
    ``padding_gap > 0`` an isolated plateau at the minimum is read as padding (:func:`floor_above_padding`).
    """
    _check_percentiles(low, high)
    values = _finite_values(_grid_sample(pixels))
    if values.size == 0:
        return np.zeros(np.shape(pixels), dtype=np.float32)
    p_low, p_high = percentiles(values, low, high)
    if p_high <= p_low:
        values = _finite_values(pixels)
        p_low, p_high = values.min(), values.max()
    p_low = floor_above_padding(values, p_low, p_high, padding_gap)
    return scale_to_range(pixels, float(p_low), float(p_high))


def apply_window(pixels: np.ndarray, center: float, width: float) -> np.ndarray:
    """A fixed window (e.g. CT soft tissue: center 40, width 400 HU) to [0, 1].

    Uses the plain ``[center - width/2, center + width/2]`` ramp rather than DICOM's VOI LUT "linear"
    half-pixel offsets: the difference is below one uint8 step for any clinical width.
    """
    _check_window(center, width)
    half = float(width) / 2.0
    return scale_to_range(pixels, float(center) - half, float(center) + half)


def _check_percentiles(low: float, high: float) -> None:
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")


def _check_window(center: float, width: float) -> None:
    if not math.isfinite(center) or not width > 0 or not math.isfinite(width):
        raise ValueError(f"window width must be positive and finite (center finite), got {center}, {width}")


def _number(owner: str, name: str, value: Any) -> float:
    """``value`` unchanged (so the stored form keeps the configured ``40``, not ``40.0``) once it is a real
    number; booleans and strings are refused, not coerced."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{owner}: {name} must be a number, got {value!r}")
    return value  # type: ignore[return-value]


class Scaling:
    """One intensity scaling strategy: ``scaling(decoded, modality_code) -> float32 in [0, 1]``.

    Subclasses are frozen dataclasses named by ``method`` (the stored form's key); :meth:`from_dict` is the
    one place stored forms become objects, and the dataclass defaults the one place defaults live.
    """

    method: ClassVar[str]

    def __call__(self, decoded: DecodedSlice, modality_code: str | None = None) -> np.ndarray:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """The stored form (``summary.json["preprocess"]["scaling"]``, each sample's ``scaling``)."""
        return {"method": self.method, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]

    @staticmethod
    def from_dict(stored: Mapping[str, Any]) -> Scaling:
        """A stored form back as its strategy (``method`` absent: percentile, as earlier runs read it).

        Also takes a ``_target_`` naming one of the strategies below (the config form), never another class.
        """
        params = {str(k): v for k, v in stored.items()}
        if "_target_" in params:
            target = str(params.pop("_target_"))
            by_target = {f"{cls.__module__}.{cls.__qualname__}": cls for cls in SCALINGS.values()}
            if target not in by_target:
                raise ValueError(
                    f"unknown scaling _target_ {target!r}; expected one of {', '.join(by_target)}"
                )
            cls = by_target[target]
        else:
            method = str(params.pop("method", PercentileScaling.method))
            if method not in SCALINGS:
                raise ValueError(f"unknown scaling method {method!r}; expected one of {', '.join(SCALINGS)}")
            cls = SCALINGS[method]
        allowed = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(
                f"{cls.method} scaling takes {sorted(allowed) or 'no parameters'}, got {', '.join(unknown)}"
            )
        return cls(**params)


@dataclass(frozen=True)
class PercentileScaling(Scaling):
    """Per-image percentiles ``low``/``high`` (in percent) to [0, 1]: the default (:func:`scale_percentile`)."""

    method: ClassVar[str] = "percentile"
    low: float = DEFAULT_LOW_PERCENTILE
    high: float = DEFAULT_HIGH_PERCENTILE
    padding_gap: float = 0.0  # > 0: an isolated minimum plateau is padding (floor_above_padding); 0: off

    def __post_init__(self) -> None:
        _check_percentiles(_number("percentile", "low", self.low), _number("percentile", "high", self.high))
        gap = _number("percentile", "padding_gap", self.padding_gap)
        if not 0.0 <= gap < 1.0:
            raise ValueError(f"percentile: padding_gap must be in [0, 1), got {gap!r}")

    def __call__(self, decoded: DecodedSlice, modality_code: str | None = None) -> np.ndarray:
        return scale_percentile(decoded.pixels, self.low, self.high, self.padding_gap)

    def to_dict(self) -> dict[str, Any]:
        """Off (0), ``padding_gap`` is left out: the stored form earlier prepare runs wrote, which reads back
        as off."""
        stored = super().to_dict()
        if not self.padding_gap:
            del stored["padding_gap"]
        return stored


@dataclass(frozen=True)
class MinMaxScaling(Scaling):
    """Per-image min/max to [0, 1] (:func:`scale_minmax`)."""

    method: ClassVar[str] = "minmax"

    def __call__(self, decoded: DecodedSlice, modality_code: str | None = None) -> np.ndarray:
        return scale_minmax(decoded.pixels)


@dataclass(frozen=True)
class DtypeScaling(Scaling):
    """The range the stored bits can express, from the reader's ``value_range`` (:func:`scale_by_dtype`)."""

    method: ClassVar[str] = "dtype"

    def __call__(self, decoded: DecodedSlice, modality_code: str | None = None) -> np.ndarray:
        return scale_by_dtype(decoded.pixels, decoded.value_range)


@dataclass(frozen=True)
class WindowScaling(Scaling):
    """Fixed windows by modality code or class (:func:`apply_window`), percentile ``low``/``high`` for the rest.

    ``windows`` maps a code to ``[center, width]`` or ``{center: .., width: ..}``; it is kept as sorted
    ``(code, (center, width))`` pairs so the object stays immutable and two orderings compare equal. The window
    is chosen by ``modality_code``: in ``prepare`` the file's header code, and at prediction time also the
    header code (the class is what is being predicted, so it cannot choose the window); a file without a
    header code, and MR or PET (no absolute units to window), get the percentile fallback.
    """

    method: ClassVar[str] = "window"
    windows: Any = field(default_factory=dict)
    low: float = DEFAULT_LOW_PERCENTILE
    high: float = DEFAULT_HIGH_PERCENTILE

    def __post_init__(self) -> None:
        entries = self.windows.items() if isinstance(self.windows, Mapping) else self.windows
        pairs = []
        for code, entry in entries:
            center, width = _window_entry(str(code), entry)
            pairs.append((str(code).strip().upper(), (center, width)))
        codes = [code for code, _ in pairs]
        if len(set(codes)) != len(codes):
            raise ValueError(f"window: a modality code is given twice in {codes}")
        object.__setattr__(self, "windows", tuple(sorted(pairs)))
        _check_percentiles(_number("window", "low", self.low), _number("window", "high", self.high))

    def window_for(self, modality_code: str | None) -> tuple[float, float] | None:
        """The ``(center, width)`` for a code (CR/DX/MG/RG also match ``XR``), or None."""
        if not modality_code:
            return None
        code = modality_code.strip().upper()
        windows = dict(self.windows)
        return windows.get(code) or windows.get(_CODE_ALIASES.get(code, ""))

    def __call__(self, decoded: DecodedSlice, modality_code: str | None = None) -> np.ndarray:
        window = self.window_for(modality_code)
        if window is None:
            return scale_percentile(decoded.pixels, self.low, self.high)
        return apply_window(decoded.pixels, *window)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "windows": {code: list(window) for code, window in self.windows},
            "low": self.low,
            "high": self.high,
        }


def _window_entry(code: str, entry: Any) -> tuple[float, float]:
    if isinstance(entry, Mapping) and set(entry) == {"center", "width"}:
        center, width = entry["center"], entry["width"]
    elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 2:
        center, width = entry
    else:
        raise ValueError(f"window for {code} must be [center, width] or {{center, width}}, got {entry!r}")
    center, width = _number("window", f"{code} center", center), _number("window", f"{code} width", width)
    _check_window(center, width)
    return center, width


#: The strategies by stored ``method`` name.
SCALINGS: dict[str, type[Scaling]] = {
    cls.method: cls for cls in (PercentileScaling, MinMaxScaling, DtypeScaling, WindowScaling)
}
