"""Per-batch pixel transforms run after the batch reaches the device (GPU when there is one).

Batches travel as uint8 and become float here: a quarter of the bytes through DataLoader workers and host
to device copies, and the resize/augment work lands on the accelerator instead of two CPU cores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from modality.intensity.scaling import DEFAULT_HIGH_PERCENTILE, DEFAULT_LOW_PERCENTILE, scale_percentile

NORMALIZATIONS = ("minus_one_one", "standardize")


def normalize_01(x01: torch.Tensor, normalize: str, mean01: float, std01: float) -> torch.Tensor:
    """Pixels in [0, 1] -> model input: ``minus_one_one`` maps them to [-1, 1]; ``standardize`` uses the
    train split's exact statistics from summary.json (``mean01``/``std01`` are in [0, 1] units)."""
    if normalize == "minus_one_one":
        return x01 * 2.0 - 1.0
    if normalize == "standardize":
        if std01 <= 0:
            raise ValueError(f"cannot standardise with std01={std01}")
        return (x01 - mean01) / std01
    raise ValueError(f"unknown normalize '{normalize}', expected one of {NORMALIZATIONS}")


#: Grey levels :func:`equalize_batch` counts (the stored slices' own 8 bits).
EQUALIZE_LEVELS = 256


def equalize_batch(x01: torch.Tensor) -> torch.Tensor:
    """Each image's grey levels replaced by their mid-rank in that image: histogram equalisation, in [0, 1].

    Why: what differs between two sites' pictures of the same anatomy is largely a monotonic intensity curve
    (window/level, display gamma, vendor scaling, an 8-bit export's window), and an image's ranks do not
    change under any increasing curve. Values are counted on :data:`EQUALIZE_LEVELS` levels (rounded); a level
    shared by many pixels (air, an export's clipped ends) becomes one value, the middle of its rank range, so a
    flat background stays flat. Any strictly increasing map of the levels gives the same output exactly.
    """
    if x01.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x01.shape)}")
    top = EQUALIZE_LEVELS - 1
    levels = x01.float().clamp(0.0, 1.0).mul(top).round().long().flatten(1)
    counts = torch.zeros(levels.shape[0], EQUALIZE_LEVELS, device=x01.device)
    counts.scatter_add_(1, levels, torch.ones(levels.shape, device=x01.device))
    below = counts.cumsum(1) - counts
    mid_rank = (below + counts / 2.0) / levels.shape[1]
    return mid_rank.gather(1, levels).view_as(x01).to(x01.dtype)


def resize_batch(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Antialiased bilinear resize of a float batch to ``size`` x ``size`` (no-op when already there)."""
    if size is None or (images.shape[-1] == size and images.shape[-2] == size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


#: Knobs that are probabilities (per image); the other augmentation knobs are non-negative magnitudes.
_PROBABILITIES = ("hflip", "vflip", "blur", "export", "channel_dropout")
_MAGNITUDES = ("rotate_deg", "scale", "translate", "brightness", "contrast", "gamma", "blur_sigma", "noise")


def _knob(name: str, value: Any) -> float:
    # Booleans and strings are refused, not coerced: ``hflip: true`` or ``noise: "0.1"`` is a config mistake.
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"augment.{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class BatchAugment:
    """The training augmentation (:func:`augment_batch`), checked once when built.

    Built by Hydra from ``data.augment``'s ``_target_`` (``configs/data/demo.yaml`` spells out every knob, so
    ``data.augment.export=0.3`` overrides one), or by :meth:`from_config` from a plain mapping (tests, user
    code): an unknown key is an error, not a knob silently ignored. Every knob at 0 is "no augmentation", the
    same as ``data.augment=null``. Values are stored as floats, so ``to_dict`` (``run_summary.json``'s
    ``augment``) reads the same whether the config said ``15`` or ``15.0``.

    Probabilities in [0, 1]: ``hflip``, ``vflip``, ``blur``, ``export``, ``channel_dropout`` (two-channel input
    only, ``data.equalize=both``: per image, one of the two pictures, either alike, replaced by flat mid-grey, so
    the network learns to answer from each alone instead of leaning on whichever fits the training sources
    best; applied by :func:`prepare_batch`). Non-negative magnitudes:
    ``rotate_deg``, ``scale`` (below 1: a zoom of ``1 - scale`` must stay positive), ``translate``,
    ``brightness``, ``contrast``, ``gamma``, ``blur_sigma``, ``noise``. ``export_*`` are
    :func:`export_images`'s options, with its defaults and its checks.
    """

    hflip: float = 0.0
    vflip: float = 0.0
    rotate_deg: float = 0.0
    scale: float = 0.0
    translate: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0
    blur: float = 0.0
    blur_sigma: float = 0.0
    noise: float = 0.0
    export: float = 0.0
    channel_dropout: float = 0.0
    export_window_low: float = 0.4
    export_window_width: float = 0.25
    export_quality: tuple[int, int] = (30, 95)
    export_downscale: float = 3.0

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            value = _knob(name, getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name} is a probability and must be in [0, 1], got {value}")
            object.__setattr__(self, name, value)
        for name in _MAGNITUDES:
            value = _knob(name, getattr(self, name))
            if value < 0.0:
                raise ValueError(f"augment.{name} is a magnitude and must be >= 0, got {value}")
            object.__setattr__(self, name, value)
        if self.scale >= 1.0:
            raise ValueError(f"augment.scale must be < 1 (zoom in [1 - scale, 1 + scale]), got {self.scale}")
        for name in ("export_window_low", "export_window_width", "export_downscale"):
            object.__setattr__(self, name, _knob(name, getattr(self, name)))
        quality = self.export_quality
        if isinstance(quality, str | bytes) or not isinstance(quality, Sequence) or len(quality) != 2:
            raise ValueError(f"augment.export_quality must be [low, high], got {quality!r}")
        if any(isinstance(q, bool) or not isinstance(q, Integral) for q in quality):
            raise ValueError(f"augment.export_quality must hold two integers, got {list(quality)}")
        object.__setattr__(self, "export_quality", (int(quality[0]), int(quality[1])))
        _check_export_options(**self.export_options())

    @property
    def enabled(self) -> bool:
        """Whether any step is on (``blur_sigma`` and the ``export_*`` options alone change nothing)."""
        return any(getattr(self, name) for name in (*_PROBABILITIES, *_MAGNITUDES) if name != "blur_sigma")

    def export_options(self) -> dict[str, Any]:
        """The keyword options of :func:`export_images`."""
        return {name: getattr(self, f"export_{name}") for name in EXPORT_OPTIONS}

    def to_dict(self) -> dict[str, Any]:
        """Every knob, plain types (``export_quality`` as a list), for ``run_summary.json`` and logs."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["export_quality"] = list(self.export_quality)
        return out

    @classmethod
    def from_config(cls, augment: BatchAugment | Mapping[str, Any] | None) -> BatchAugment:
        """``augment`` as a :class:`BatchAugment`: an object unchanged, None as all off, a mapping checked key by
        key (a ``_target_`` naming this class is accepted, so a config block not yet instantiated also works)."""
        if augment is None:
            return cls()
        if isinstance(augment, cls):
            return augment
        if not isinstance(augment, Mapping):
            raise ValueError(
                f"augment must be a BatchAugment, a mapping or null, got {type(augment).__name__}"
            )
        params = {str(key): value for key, value in augment.items()}
        target = params.pop("_target_", None)
        own = f"{cls.__module__}.{cls.__qualname__}"
        if target is not None and target != own:
            raise ValueError(f"augment _target_ must be {own}, got {target!r}")
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise ValueError(
                f"unknown augment key(s) {', '.join(unknown)}; expected some of {', '.join(allowed)}"
            )
        return cls(**params)


def augment_batch(
    images: torch.Tensor, augment: BatchAugment | Mapping[str, Any], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Light, label-preserving augmentation on a float batch in [0, 1] units.

    ``augment``: a :class:`BatchAugment`, or a mapping of its knobs (checked by
    :meth:`BatchAugment.from_config`). Knobs (all optional, 0 = off): ``hflip``/``vflip`` (probabilities), ``rotate_deg`` (max absolute angle),
    ``scale`` (max relative zoom in or out), ``translate`` (max shift, fraction of the side),
    ``brightness``/``contrast`` (max relative change), ``gamma`` (max absolute log-gamma: ``x ** g`` with
    ``ln g`` uniform in [-gamma, gamma], the non-linear part of a different window or display curve),
    ``blur`` (probability of a 3x3 Gaussian blur: coarser reconstruction kernels and low matrices, e.g. 64x64
    EPI upsampled; with ``blur_sigma`` > 0 a Gaussian of per-image sigma uniform in [0.3, blur_sigma] pixels
    instead, for the spread of post-reconstruction filters, e.g. smoothed clinical PET vs raw iterative;
    measured worse on the real corpus at 1.5 px, see docs/results.md) and ``noise`` (max std of additive
    Gaussian noise, per image uniform in [0, noise]: low-dose CT, low-field MR). Geometry uses one affine
    grid per batch so the cost stays one ``grid_sample`` whatever is enabled.

    ``export`` (probability per image, last, after every other step): the image is turned into what prepare
    would store from an 8-bit PNG/JPEG export of it (:func:`export_images`: random window, 8-bit, smaller
    matrix, JPEG at random quality, then prepare's percentile stretch), so "8-bit/JPEG" stops meaning
    "radiograph". Its options: ``export_window_low`` (0.4), ``export_window_width`` (0.25),
    ``export_quality`` ([30, 95]), ``export_downscale`` (3.0), as in :func:`export_images`.
    """
    augment = BatchAugment.from_config(augment)
    batch = images.shape[0]
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(batch, device="cpu", generator=generator).mul(high - low).add(low).to(device)

    out = images
    rotate = math.radians(augment.rotate_deg)
    scale, translate, hflip, vflip = augment.scale, augment.translate, augment.hflip, augment.vflip
    if rotate or scale or translate or hflip or vflip:
        angle = uniform(-rotate, rotate)
        zoom = uniform(1.0 - scale, 1.0 + scale)
        sign_x = torch.where(uniform(0.0, 1.0) < hflip, -1.0, 1.0)
        sign_y = torch.where(uniform(0.0, 1.0) < vflip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(batch, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * sign_x, -sin
        theta[:, 1, 0], theta[:, 1, 1] = sin, cos * sign_y
        theta[:, 0, 2], theta[:, 1, 2] = (
            uniform(-translate, translate) * 2,
            uniform(-translate, translate) * 2,
        )
        grid = F.affine_grid(theta.to(out.dtype), list(out.shape), align_corners=False)
        out = F.grid_sample(out, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = _intensity_curve(out, augment, uniform, generator)
    brightness, contrast = augment.brightness, augment.contrast
    if contrast:
        factor = uniform(1.0 - contrast, 1.0 + contrast).view(-1, 1, 1, 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * factor + mean
    if brightness:
        out = out + uniform(-brightness, brightness).view(-1, 1, 1, 1)
    if contrast or brightness:
        out = out.clamp(0.0, 1.0)
    if augment.export:
        chosen = uniform(0.0, 1.0).cpu() < augment.export
        out = export_images(out, generator, chosen=chosen, **augment.export_options())
    return out


#: ``export_images`` keyword options, set as ``data.augment.export_<name>`` (:class:`BatchAugment`).
EXPORT_OPTIONS = ("window_low", "window_width", "quality", "downscale")
#: The range export windows are placed in: an image's 1st to 99th percentile.
_CONTENT_QUANTILES = torch.tensor([0.01, 0.99])


def export_images(
    x01: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    chosen: torch.Tensor | None = None,
    window_low: float = 0.4,
    window_width: float = 0.25,
    quality: Sequence[int] = (30, 95),
    downscale: float = 3.0,
) -> torch.Tensor:
    """Simulate publishing each image as an 8-bit PNG/JPEG export and reading it back with prepare.

    Per image, drawn from ``generator`` (CPU; the global RNG when None):

    1. a display window ``[lo, hi]``, ``lo`` uniform in [0, ``window_low``], width uniform in
       [``window_width``, 1] (``hi`` capped at 1), as fractions of the 1st-99th percentile range of the
       image's non-zero pixels (its content; zero is pad and empty background). For most stored slices,
       which prepare already stretched, that range is nearly [0, 1]; but a slice whose anatomy sits in a
       narrow bright band would be blanked by a window of the nominal range, which no exporter does.
       Clipped and stretched to [0, 1];
    2. a smaller matrix: the side divided by a factor uniform in [1, ``downscale``], antialiased, in float
       (an exporter resizes the windowed values before rounding them; this also fills the grey levels that
       stretching a uint8 slice would leave empty);
    3. 8-bit quantisation and a greyscale JPEG at an integer quality uniform in ``quality`` (inclusive). A
       grey picture saved as an RGB JPEG decodes to three identical channels equal to the grey JPEG (checked
       with torchvision's libjpeg), which the image reader reads as grey: RGB files need no separate path;
    4. prepare's own steps for an 8-bit file: the per-image percentile stretch
       (:func:`modality.intensity.scaling.scale_percentile`, 0.5 / 99.5 %), enlarging back to the stored
       size (bilinear, as :func:`modality.intensity.geometry.fit_to_square` enlarges) and uint8 rounding.

    ``x01``: float (B, C, H, W) in [0, 1] on any device (the export runs on the CPU, image by image);
    ``chosen``: bool (B,) of the images to export (default all); the others are returned unchanged. Every
    parameter is drawn for every image, chosen or not, so the random stream does not depend on the choice.
    """
    batch = x01.shape[0]
    _check_export_options(window_low, window_width, quality, downscale)
    q_low, q_high = int(quality[0]), int(quality[1])

    def draw(low: float, high: float) -> torch.Tensor:
        return torch.rand(batch, generator=generator).mul(high - low).add(low)

    lo = draw(0.0, window_low)
    hi = (lo + draw(window_width, 1.0)).clamp(max=1.0)
    factor = draw(1.0, downscale)
    qualities = draw(q_low, q_high + 1).floor().clamp(max=q_high).long()
    picked = torch.arange(batch) if chosen is None else torch.nonzero(chosen.cpu(), as_tuple=False).flatten()
    if picked.numel() == 0:
        return x01
    source = x01[picked.to(x01.device)].detach().float().cpu()
    height, width = source.shape[-2:]
    exported = torch.empty_like(source)
    for row, index in enumerate(picked.tolist()):
        small = (max(8, round(height / float(factor[index]))), max(8, round(width / float(factor[index]))))
        for channel in range(source.shape[1]):
            image = source[row, channel]
            # Percentiles of the non-zero pixels (zero is pad and empty background) on a 1-in-16 grid:
            # cheap, and exact enough to place a window.
            grid = image[::4, ::4].flatten()
            content = grid[grid > 0]
            p01, p99 = torch.quantile(content if content.numel() >= 16 else grid, _CONTENT_QUANTILES).tolist()
            if p99 - p01 < 1.0 / 255.0:
                p01, p99 = 0.0, 1.0
            low = p01 + float(lo[index]) * (p99 - p01)
            span = float(hi[index] - lo[index]) * (p99 - p01)
            image = image.sub(low).div_(span).clamp_(0.0, 1.0)[None, None]
            if small != (height, width):
                image = F.interpolate(image, size=small, mode="bilinear", align_corners=False, antialias=True)
            stored = image[0].mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
            jpeg = encode_jpeg(stored, quality=int(qualities[index]))
            read = decode_jpeg(jpeg, mode=ImageReadMode.GRAY)[0].numpy().astype(np.float32)
            stretched = torch.from_numpy(
                scale_percentile(read, DEFAULT_LOW_PERCENTILE, DEFAULT_HIGH_PERCENTILE)
            )[None, None]
            if stretched.shape[-2:] != (height, width):
                stretched = F.interpolate(
                    stretched, size=(height, width), mode="bilinear", align_corners=False
                )
            exported[row, channel] = stretched[0, 0].clamp_(0.0, 1.0).mul_(255.0).round_().div_(255.0)
    out = x01.clone()
    out[picked.to(x01.device)] = exported.to(device=x01.device, dtype=x01.dtype)
    return out


def _check_export_options(
    window_low: float, window_width: float, quality: Sequence[int], downscale: float
) -> None:
    if not 1 <= int(quality[0]) <= int(quality[1]) <= 100:
        raise ValueError(f"export quality must satisfy 1 <= low <= high <= 100, got {list(quality)}")
    if downscale < 1.0 or not 0.0 < window_width <= 1.0 or not 0.0 <= window_low < 1.0:
        raise ValueError(
            f"export needs downscale >= 1, 0 < window_width <= 1, 0 <= window_low < 1; got {downscale}, "
            f"{window_width}, {window_low}"
        )


def simulate_export(
    images_uint8: torch.Tensor | np.ndarray, seed: int, **options: Any
) -> torch.Tensor | np.ndarray:
    """Every image of a uint8 batch as prepare would store its 8-bit PNG/JPEG export (:func:`export_images`
    with probability 1 and ``options``), from a generator seeded with ``seed``: the same input and seed give
    the same output on any machine. For evaluation: held-out DICOM-derived slices -> simulated exports.

    Accepts (H, W), (N, H, W) or (N, C, H, W), as a tensor or a numpy array; returns the same shape and type.
    """
    as_numpy = isinstance(images_uint8, np.ndarray)
    images = torch.from_numpy(np.ascontiguousarray(images_uint8)) if as_numpy else images_uint8
    if images.dtype != torch.uint8:
        raise ValueError(f"simulate_export takes uint8 images, got {images.dtype}")
    shape = images.shape
    if images.ndim not in (2, 3, 4):
        raise ValueError(
            f"simulate_export takes (H, W), (N, H, W) or (N, C, H, W) images, got {tuple(shape)}"
        )
    batch = images.reshape(-1, 1, *shape[-2:]) if images.ndim < 4 else images
    generator = torch.Generator().manual_seed(int(seed))
    exported = export_images(batch.float().div(255.0), generator, **options)
    out = exported.mul(255.0).round_().clamp_(0, 255).to(torch.uint8).reshape(shape)
    return out.cpu().numpy() if as_numpy else out.to(images.device)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of each image of a NCHW batch with its own ``sigma`` (pixels), replicate edges.

    One grouped convolution per axis for the whole batch: the images become channels of a single sample.
    """
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets[None, :] / sigma.to(images.device, torch.float32)[:, None]) ** 2)
    weights = (weights / weights.sum(dim=1, keepdim=True)).to(images.dtype)
    weights = weights.repeat_interleave(channels, dim=0)  # (batch * channels, 2 * radius + 1)
    flat = images.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="replicate")
    flat = F.conv2d(flat, weights[:, None, None, :], groups=batch * channels)
    flat = F.pad(flat, (0, 0, radius, radius), mode="replicate")
    flat = F.conv2d(flat, weights[:, None, :, None], groups=batch * channels)
    return flat.reshape(batch, channels, height, width)


def pet_from_mr(
    x01: torch.Tensor, generator: torch.Generator | None = None, sigma: tuple[float, float] = (0.02, 0.045)
) -> torch.Tensor:
    """A brain FDG-PET-like picture from a stored MR slice (N, 1, H, W in [0, 1]): a Gaussian blur of per-image
    sigma uniform in ``sigma`` times the side (PET's ~6-8 mm resolution on a ~25 cm field of view), then
    prepare's percentile stretch again (1st-99th percentile to 0-1).

    Why so little: what tells brain PET from brain MR at a glance is resolution (a PET brain is a smooth
    blob with a bright cortex ribbon, no edges, no skull or fat), and the grey/white contrast of the EPI and
    T2 slices the corpus holds is already the right way round. No uptake model: this is a stand-in for
    the brain PET a pool may lack, not a PET simulator (data.synthetic_pet, measured under LOGO)."""
    side = x01.shape[-1]
    factor = torch.rand(x01.shape[0], generator=generator) * (sigma[1] - sigma[0]) + sigma[0]
    return _stretch_1_99(gaussian_blur(x01, factor * side))


def _stretch_1_99(images: torch.Tensor) -> torch.Tensor:
    """Each image's 1st-99th percentile stretched to [0, 1], clipped: what a synthetic PET slice is given after
    it is made, as prepare's percentile scaling gives a stored one."""
    flat = images.flatten(1)
    low = torch.quantile(flat, 0.01, dim=1).view(-1, 1, 1, 1)
    high = torch.quantile(flat, 0.99, dim=1).view(-1, 1, 1, 1)
    return ((images - low) / (high - low).clamp_min(1e-6)).clamp(0.0, 1.0)


def pet_from_ct(
    x01: torch.Tensor,
    generator: torch.Generator | None = None,
    sigma: tuple[float, float] = (0.004, 0.015),
    max_spots: int = 4,
) -> torch.Tensor:
    """A whole-body FDG-PET-like picture from a stored CT slice (N, 1, H, W in [0, 1]).

    Per image: uptake highest at the body's soft-tissue level (the median of its pixels above air) and falling
    off on either side, so lung and fat come out dark and bone dim, as in FDG PET; a random baseline under 0
    to ``max_spots`` hot spots inside the body (heart, bladder, kidneys, lesions: what sets the display range
    of a body PET); noise growing with the square root of uptake (counting statistics), then a Gaussian blur
    of sigma uniform in ``sigma`` times the side (PET's ~6 mm resolution and 4-5 mm pixels on a 50-70 cm
    field), which also makes the noise blotchy as reconstruction does; then the percentile stretch again.

    Why: a pool's whole-body PET is often one study (the shared corpus: one patient's 270 slices), so a fold
    that holds it out has seen only brain PET and reads body PET as MR; :func:`pet_from_mr` makes brain PET
    only. Like it, a stand-in for missing PET sources, not a PET simulator (``data.synthetic_pet_ct``).
    """
    batch, _, height, width = x01.shape
    if batch == 0:
        return x01

    def draw(low: float, high: float, *size: int) -> torch.Tensor:
        return torch.rand(size or (batch,), generator=generator) * (high - low) + low

    images = x01.detach().float().cpu()
    body = images > 0.1  # air and padding sit at 0 after prepare's stretch
    flat = images.flatten(1)
    inside = torch.where(body.flatten(1), flat, torch.full_like(flat, float("nan")))
    level = torch.nanquantile(inside, 0.5, dim=1).nan_to_num(0.5).view(-1, 1, 1, 1)
    spread = torch.nanquantile(inside, 0.75, dim=1) - torch.nanquantile(inside, 0.25, dim=1)
    spread = spread.nan_to_num(0.1).clamp(min=0.03).view(-1, 1, 1, 1)
    uptake = torch.exp(-0.5 * ((images - level) / spread) ** 2) * body
    # organs differ in uptake, which CT's soft tissue does not show: a smooth log-normal field over it
    coarse = torch.randn((batch, 1, max(2, height // 16), max(2, width // 16)), generator=generator)
    field = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    uptake = uptake * torch.exp(field * draw(0.2, 0.6).view(-1, 1, 1, 1))
    # scatter and randoms: a faint floor outside the body too
    uptake = (uptake + 0.05 * (~body)) * draw(0.2, 0.5).view(-1, 1, 1, 1)
    # hot spots centred on body pixels (anywhere when the slice has no body)
    spots = max_spots + 1
    count = torch.randint(0, spots, (batch,), generator=generator)
    weights = body.flatten(1).float() + 1e-6
    centres = torch.multinomial(weights, spots, replacement=True, generator=generator)
    rows, cols = (centres // width).float(), (centres % width).float()
    radius = draw(0.015, 0.06, batch, spots) * width
    amplitude = draw(0.5, 2.0, batch, spots) * (torch.arange(spots)[None, :] < count[:, None])
    yy = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1)
    xx = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1)
    blobs = torch.exp(
        -0.5
        * ((yy - rows[..., None, None]) ** 2 + (xx - cols[..., None, None]) ** 2)
        / radius[..., None, None] ** 2
    )
    uptake = uptake + (blobs * amplitude[..., None, None]).sum(dim=1, keepdim=True) * body
    # counting noise: ``counts`` events per pixel at unit uptake (low-dose, short frames: few), Gaussian
    # approximation of Poisson, relative error 1 / sqrt(events)
    counts = torch.exp(draw(math.log(2.0), math.log(40.0))).view(-1, 1, 1, 1)
    events = uptake.clamp(min=0.0) * counts
    noisy = (events + torch.randn(uptake.shape, generator=generator) * events.sqrt()) / counts
    blurred = gaussian_blur(noisy.clamp(min=0.0), draw(sigma[0], sigma[1]) * width)
    return _stretch_1_99(blurred).to(device=x01.device, dtype=x01.dtype)


def padded_ct_look(
    x01: torch.Tensor,
    generator: torch.Generator | None = None,
    lift: tuple[float, float] = (0.25, 0.6),
    radius: tuple[float, float] = (0.97, 1.0),
) -> torch.Tensor:
    """A stored CT picture (N, 1, H, W in [0, 1]) as a scanner that stores the corners outside its reconstruction
    circle as undeclared padding gives it: inside a circle of radius uniform in ``radius`` times half the
    shorter side, ``a + (1 - a) x`` with ``a`` uniform in ``lift`` (air grey); outside it 0.

    Why: about half of the CT pictures in the shared corpus look like that (the padding plateau, -2048 or -3024
    HU, becomes prepare's low percentile, so air at -1000 HU comes out at 0.3-0.6), and almost all of them come
    from one source group; a fold that holds that group out has seen only black air and calls the grey-air CT
    X-ray. Making every picture black instead (``scaling.padding_gap``) moved the CT/MR boundary too, because
    black-air CT looks more like MR's background. Here the network sees both looks of the same CT, so neither
    boundary can rest on the air level. The lift matches the stretch: with padding at ``P`` HU and the high
    percentile at ``H``, air lands at ``(P_air - P) / (H - P)``, 0.3-0.6 for ``P`` in [-3024, -2048] and ``H``
    in [300, 1500]."""
    batch, _, height, width = x01.shape
    if batch == 0:
        return x01

    def draw(low: float, high: float) -> torch.Tensor:
        return (torch.rand(batch, generator=generator) * (high - low) + low).view(-1, 1, 1, 1)

    images = x01.detach().float().cpu()
    a = draw(*lift)
    r = draw(*radius) * 0.5 * min(height, width)
    yy = torch.arange(height, dtype=torch.float32).view(1, 1, -1, 1) - (height - 1) / 2.0
    xx = torch.arange(width, dtype=torch.float32).view(1, 1, 1, -1) - (width - 1) / 2.0
    inside = (yy**2 + xx**2) <= r**2
    out = torch.where(inside, a + (1.0 - a) * images, torch.zeros_like(images))
    return out.clamp(0.0, 1.0).to(device=x01.device, dtype=x01.dtype)


def _intensity_curve(
    out: torch.Tensor, augment: BatchAugment, uniform: Any, generator: torch.Generator | None
) -> torch.Tensor:
    """Gamma, blur and noise (see ``augment_batch``); each is skipped at 0 so older configs are unchanged."""
    gamma, blur, noise = augment.gamma, augment.blur, augment.noise
    view = (-1, 1, 1, 1)
    if gamma:
        exponent = torch.exp(uniform(-gamma, gamma)).view(view).to(out.dtype)
        out = out.clamp(min=0.0).pow(exponent)
    blur_sigma = augment.blur_sigma
    if blur and blur_sigma:
        sigma = uniform(0.3, max(0.3, blur_sigma))
        blurred = gaussian_blur(out, sigma)
        out = torch.where((uniform(0.0, 1.0) < blur).view(view), blurred, out)
    elif blur:
        kernel = torch.tensor([0.25, 0.5, 0.25], device=out.device, dtype=out.dtype)
        kernel = (kernel[:, None] * kernel[None, :]).view(1, 1, 3, 3).expand(out.shape[1], 1, 3, 3)
        blurred = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), kernel, groups=out.shape[1])
        out = torch.where((uniform(0.0, 1.0) < blur).view(view), blurred, out)
    if noise:
        sigma = uniform(0.0, noise).view(view).to(out.dtype)
        draws = torch.randn(out.shape, generator=generator).to(device=out.device, dtype=out.dtype)
        out = (out + draws * sigma).clamp(0.0, 1.0)
    return out


def equalize_mode(value: Any) -> bool | str:
    """``data.equalize`` checked: ``false`` (the stored picture), ``true`` (its equalised copy) or ``"both"``
    (the two as two channels); an unknown value is an error, not "off"."""
    if isinstance(value, str) and value.lower() in ("false", "true", "both"):
        value = {"false": False, "true": True, "both": "both"}[value.lower()]
    if isinstance(value, bool) or value == "both":
        return value
    raise ValueError(f"data.equalize must be one of false, true, both; got {value!r}")


def input_channels(data_info: Mapping[str, Any]) -> int:
    """How many channels the model whose checkpoint stored ``data_info`` reads (2 with ``equalize=both``)."""
    return 2 if equalize_mode(data_info.get("equalize", False)) == "both" else 1


def drop_channels(x01: torch.Tensor, probability: float) -> torch.Tensor:
    """Per image with ``probability``, one of its channels (each alike) replaced by flat mid-grey (0.5)."""
    if probability <= 0.0:
        return x01
    if x01.shape[1] < 2:
        raise ValueError("augment.channel_dropout needs two input channels (data.equalize=both)")
    batch, channels = x01.shape[:2]
    hit = torch.rand(batch, device=x01.device) < probability
    which = torch.randint(0, channels, (batch,), device=x01.device)
    mask = hit[:, None] & (torch.arange(channels, device=x01.device)[None, :] == which[:, None])
    return torch.where(mask[:, :, None, None], torch.full_like(x01, 0.5), x01)


def prepare_batch(
    images: torch.Tensor,
    *,
    normalize: str,
    mean01: float,
    std01: float,
    image_size: int | None,
    augment: BatchAugment | Mapping[str, Any] | None,
    equalize: bool | str = False,
) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> model input: optional augmentation, resize, optional histogram equalisation
    (:func:`equalize_batch`, on the picture the network sees: after the augmentation and its simulated
    exports, so a real export and a simulated one are equalised alike), then normalisation.

    ``equalize="both"``: two channels, the picture and its equalised copy (augmentation's
    ``channel_dropout`` acts on them), normalised alike."""
    mode = equalize_mode(equalize)
    x01 = images.float().div(255.0)
    augment = BatchAugment.from_config(augment)
    if augment.enabled:
        x01 = augment_batch(x01, augment)
    x01 = resize_batch(x01, image_size)
    if mode == "both":
        x01 = torch.cat([x01, equalize_batch(x01)], dim=1)
    elif mode:
        x01 = equalize_batch(x01)
    x01 = drop_channels(x01, augment.channel_dropout)  # an error on one channel unless 0
    return normalize_01(x01, normalize, mean01, std01)


def model_inputs(
    images: torch.Tensor,
    data_info: Mapping[str, Any],
    augment: BatchAugment | Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> the input of the model whose checkpoint stored ``data_info``: its normalisation,
    input size and equalisation, read here only (training batches, shard evaluation, raw-file prediction)."""
    return prepare_batch(
        images,
        normalize=str(data_info["normalize"]),
        mean01=float(data_info["mean01"]),
        std01=float(data_info["std01"]),
        image_size=int(data_info["input_size"]) if data_info.get("input_size") else None,
        augment=augment,
        equalize=data_info.get("equalize", False),
    )
