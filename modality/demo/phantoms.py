"""Cheap anatomical phantoms for the built-in demo dataset: pure numpy, no I/O.

A phantom is an ordered list of ellipsoids, each filled with one tissue; later ellipsoids paint over
earlier ones, so an organ placed after the body outline sits inside it. Slicing the list at a depth
gives a tissue label map (CT, MR and PET slices); summing attenuation through a coarse label volume
gives a radiograph. The modality renderers then turn tissue labels into each modality's physical
units (HU, arbitrary MR signal, PET activity, X-ray line integrals) with the noise and blur that make
the modalities look different for the right reasons rather than by matrix size or file layout.

Every random choice comes from the ``numpy.random.Generator`` the caller passes, so one seed gives one
patient, byte for byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

# name: (CT HU, MR T1-weighted, MR T2-weighted, PET SUV, X-ray attenuation per mm at ~60 keV)
TISSUES: dict[str, tuple[float, float, float, float, float]] = {
    "air": (-1000.0, 0.0, 0.0, 0.0, 0.0),
    "lung": (-850.0, 0.04, 0.05, 0.5, 0.004),
    "fat": (-100.0, 1.0, 0.75, 0.3, 0.018),
    "skin": (30.0, 0.55, 0.45, 0.8, 0.021),
    "soft": (40.0, 0.5, 0.45, 0.8, 0.021),
    "muscle": (50.0, 0.42, 0.3, 0.7, 0.021),
    "brain_wm": (28.0, 0.78, 0.35, 3.5, 0.021),
    "brain_gm": (40.0, 0.55, 0.52, 9.0, 0.021),
    "csf": (8.0, 0.08, 1.0, 0.4, 0.020),
    "fluid": (10.0, 0.1, 0.95, 0.4, 0.020),
    "bone": (1100.0, 0.04, 0.04, 0.6, 0.055),
    "marrow": (300.0, 0.85, 0.6, 1.8, 0.030),
    "liver": (60.0, 0.58, 0.25, 2.4, 0.022),
    "spleen": (50.0, 0.45, 0.5, 2.0, 0.022),
    "kidney": (35.0, 0.4, 0.6, 4.5, 0.021),
    "blood": (45.0, 0.35, 0.6, 1.8, 0.021),
    "myocardium": (50.0, 0.45, 0.35, 7.0, 0.021),
    "urine": (5.0, 0.1, 1.0, 30.0, 0.020),
    "gas": (-950.0, 0.0, 0.0, 0.0, 0.0),
    "glandular": (40.0, 0.45, 0.5, 1.2, 0.026),
    "cartilage": (100.0, 0.35, 0.55, 0.6, 0.022),
    "disc": (80.0, 0.35, 0.85, 0.6, 0.022),
    "cord": (35.0, 0.6, 0.4, 2.5, 0.021),
    "lesion": (65.0, 0.4, 0.8, 8.0, 0.023),
    "calcification": (400.0, 0.1, 0.1, 0.5, 0.09),
}
TISSUE_NAMES: tuple[str, ...] = tuple(TISSUES)
TISSUE_INDEX: dict[str, int] = {name: i for i, name in enumerate(TISSUE_NAMES)}
_TABLE = np.array([TISSUES[name] for name in TISSUE_NAMES], dtype=np.float32)
CT_HU, MR_T1, MR_T2, PET_SUV, XR_MU = (_TABLE[:, i] for i in range(5))
# At the ~20 keV of mammography soft tissues attenuate several times more and differ far more (fat vs
# glandular), which is why a mammogram shows parenchyma a chest film cannot.
# Fat suppression darkens fat on T2: the same anatomy, a different histogram.
MR_T2_FAT_SAT = MR_T2.copy()
MR_T2_FAT_SAT[TISSUE_NAMES.index("fat")] *= 0.15
MR_T2_FAT_SAT[TISSUE_NAMES.index("marrow")] *= 0.3
MG_MU = XR_MU * 3.8
MG_MU[TISSUE_NAMES.index("fat")] = 0.046
MG_MU[TISSUE_NAMES.index("glandular")] = 0.085
MG_MU[TISSUE_NAMES.index("calcification")] = 1.2


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid of one tissue, oriented as ``Rz(angle) @ Rx(tilt)`` (z: the through-plane axis).

    ``tilt`` exists for ribs, which run obliquely: a tilted thin shell projects as the familiar arcs.
    """

    centre: tuple[float, float, float]  # mm (x, y, z)
    axes: tuple[float, float, float]  # semi-axes in mm
    tissue: str
    angle: float = 0.0  # radians, about z
    tilt: float = 0.0  # radians, about the ellipsoid's own x axis


@dataclass(frozen=True)
class Phantom:
    """A body part in a frame where slices are planes of constant z and radiographs project along ``xr_axis``.

    ``z_range`` is the extent a volume series covers; ``plane`` says which patient plane a z-slice is
    (axial, sagittal, coronal) so the DICOM writer can state the orientation honestly.
    """

    body_part: str
    ellipsoids: tuple[Ellipsoid, ...]
    z_range: tuple[float, float]
    fov: tuple[float, float]  # in-plane field of view (x, y) in mm for slices
    plane: str = "axial"
    xr_axis: str = "y"  # the axis an X-ray beam travels along


# ---------------------------------------------------------------------------------------------------
# Painting labels
# ---------------------------------------------------------------------------------------------------


def paint_labels(
    ellipsoids: tuple[Ellipsoid, ...], xs: np.ndarray, ys: np.ndarray, zs: np.ndarray
) -> np.ndarray:
    """Tissue indices on the grid ``zs x ys x xs`` (mm coordinates, 1-D each); air where nothing is.

    Each ellipsoid is evaluated only inside its bounding box, which keeps a 40-ellipsoid hand cheap.
    """
    labels = np.full((zs.size, ys.size, xs.size), TISSUE_INDEX["air"], dtype=np.uint8)
    for ell in ellipsoids:
        cx, cy, cz = ell.centre
        a, b, c = ell.axes
        cos_t, sin_t = math.cos(ell.angle), math.sin(ell.angle)
        if ell.tilt:
            half_x = half_y = half_z = max(a, b, c)
        else:
            half_x, half_y, half_z = math.hypot(a * cos_t, b * sin_t), math.hypot(a * sin_t, b * cos_t), c
        ix = np.flatnonzero(np.abs(xs - cx) <= half_x)
        iy = np.flatnonzero(np.abs(ys - cy) <= half_y)
        iz = np.flatnonzero(np.abs(zs - cz) <= half_z)
        if ix.size == 0 or iy.size == 0 or iz.size == 0:
            continue
        dx = (xs[ix[0] : ix[-1] + 1] - cx)[None, None, :]
        dy = (ys[iy[0] : iy[-1] + 1] - cy)[None, :, None]
        dz = (zs[iz[0] : iz[-1] + 1] - cz)[:, None, None]
        u = dx * cos_t + dy * sin_t
        v = -dx * sin_t + dy * cos_t
        if ell.tilt:
            cos_k, sin_k = math.cos(ell.tilt), math.sin(ell.tilt)
            v, dz = v * cos_k + dz * sin_k, -v * sin_k + dz * cos_k
        inside = (u / a) ** 2 + (v / b) ** 2 + (dz / c) ** 2 <= 1.0
        view = labels[iz[0] : iz[-1] + 1, iy[0] : iy[-1] + 1, ix[0] : ix[-1] + 1]
        view[inside] = TISSUE_INDEX[ell.tissue]
    return labels


def pixel_centres(n: int, spacing: float) -> np.ndarray:
    """Coordinates (mm) of ``n`` pixel centres ``spacing`` apart, centred on 0."""
    return (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * spacing


def slice_labels(phantom: Phantom, z: float, rows: int, cols: int, spacing: float) -> np.ndarray:
    """The ``rows x cols`` tissue map of the plane at depth ``z``; y runs down the rows."""
    return paint_labels(
        phantom.ellipsoids,
        pixel_centres(cols, spacing),
        pixel_centres(rows, spacing),
        np.array([z], dtype=np.float32),
    )[0]


def project_attenuation(
    phantom: Phantom,
    beam_axis: str,
    rows: int,
    cols: int,
    spacing: float,
    depth_step: float,
    mu: np.ndarray | None = None,
    depth_limit: float = 210.0,
) -> np.ndarray:
    """Line integrals of X-ray attenuation through the phantom along ``beam_axis`` (x, y or z).

    Rows run along the body's long axis (z for axial-frame phantoms, superior at the top; y for the
    others), so every radiograph comes out upright whichever way the beam travels. ``mu`` is the
    attenuation table (``XR_MU``, or ``MG_MU`` for the soft mammography spectrum); ``depth_limit``
    bounds the beam path, which is how a compression paddle flattens a breast to one thickness.
    """
    mu = XR_MU if mu is None else mu
    vertical = "z" if phantom.plane == "axial" else "y"
    if beam_axis == vertical or beam_axis not in ("x", "y", "z"):
        raise ValueError(f"cannot project {phantom.body_part} along {beam_axis!r}")
    horizontal = ({"x", "y", "z"} - {beam_axis, vertical}).pop()
    coords = {
        beam_axis: pixel_centres(round(2 * depth_limit / depth_step), depth_step),
        vertical: pixel_centres(rows, spacing) * (-1.0 if vertical == "z" else 1.0),
        horizontal: pixel_centres(cols, spacing),
    }
    labels = paint_labels(phantom.ellipsoids, coords["x"], coords["y"], coords["z"])
    order = "zyx"
    integral = mu[labels].sum(axis=order.index(beam_axis)) * depth_step
    remaining = order.replace(beam_axis, "")
    return integral if remaining[0] == vertical else integral.T


# ---------------------------------------------------------------------------------------------------
# Patient variation
# ---------------------------------------------------------------------------------------------------


def vary_patient(phantom: Phantom, rng: np.random.Generator, size_jitter: float = 0.12) -> Phantom:
    """The same anatomy in another patient: scaled per axis, rotated in-plane and shifted.

    Size, shape, position and rotation vary so that a classifier has to look at contrast and texture;
    the jitter is kept small enough that organs stay inside the body outline.
    """
    sx, sy, sz = rng.uniform(1 - size_jitter, 1 + size_jitter, size=3)
    theta = rng.uniform(-0.18, 0.18)
    shift_x, shift_y = rng.uniform(-12.0, 12.0, size=2)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    moved = []
    for ell in phantom.ellipsoids:
        x, y, z = ell.centre[0] * sx, ell.centre[1] * sy, ell.centre[2] * sz
        a, b, c = ell.axes
        moved.append(
            replace(
                ell,
                centre=(x * cos_t - y * sin_t + shift_x, x * sin_t + y * cos_t + shift_y, z),
                axes=(a * sx, b * sy, c * sz),
                angle=ell.angle + theta,
            )
        )
    z0, z1 = phantom.z_range
    return replace(phantom, ellipsoids=tuple(moved), z_range=(z0 * sz, z1 * sz))


def _jit(rng: np.random.Generator, value: float, rel: float = 0.1) -> float:
    return float(value * rng.uniform(1 - rel, 1 + rel))


# ---------------------------------------------------------------------------------------------------
# Body parts (each builder draws its own organ-level variation from rng)
# ---------------------------------------------------------------------------------------------------


def head(rng: np.random.Generator) -> Phantom:
    """Axial head: scalp, skull, grey/white matter, ventricles, eyes and sinuses in the lower slices."""
    a, b = _jit(rng, 75), _jit(rng, 92)
    skull = rng.uniform(5.0, 8.0)
    vent_w = rng.uniform(4.0, 12.0)
    e = [
        Ellipsoid((0, 0, 0), (a, b, 80), "skin"),
        Ellipsoid((0, 0, 0), (a - 3, b - 3, 77), "fat"),
        Ellipsoid((0, 0, 0), (a - 5, b - 5, 75), "bone"),
        Ellipsoid((0, 0, 0), (a - 5 - skull, b - 5 - skull, 75 - skull), "csf"),
        Ellipsoid((0, 2, 2), (a - 7 - skull, b - 7 - skull, 72 - skull), "brain_gm"),
        Ellipsoid((0, 2, 5), (a - 17 - skull, b - 18 - skull, 55 - skull), "brain_wm"),
        Ellipsoid((-vent_w, 0, 15), (4, 22, 14), "csf", 0.1),
        Ellipsoid((vent_w, 0, 15), (4, 22, 14), "csf", -0.1),
        Ellipsoid((0, 8, 10), (3, 4, 10), "csf"),
        Ellipsoid((-30, -b + 12, -45), (13, 12, 12), "fluid"),
        Ellipsoid((30, -b + 12, -45), (13, 12, 12), "fluid"),
        Ellipsoid((0, -b + 25, -62), (14, 10, 12), "gas"),
    ]
    if rng.random() < 0.3:
        e.append(
            Ellipsoid((rng.uniform(-35, 35), rng.uniform(-40, 40), rng.uniform(0, 40)), (9, 8, 8), "lesion")
        )
    return Phantom("head", tuple(e), (-65.0, 60.0), (240.0, 240.0), "axial", "x")


def chest(rng: np.random.Generator) -> Phantom:
    """Axial chest: tilted rib shells round the cavity, lungs, heart, aorta, spine, clavicles, arms.

    The trunk runs far beyond the slab a CT covers so that a frontal radiograph shows a torso with
    vertical flanks rather than an isolated oval.
    """
    a, b = _jit(rng, 165), _jit(rng, 110)
    fat = rng.uniform(6.0, 25.0)
    e = [
        Ellipsoid((0, 0, -40), (a, b, 420), "skin"),
        Ellipsoid((0, 0, -40), (a - 2, b - 2, 418), "fat"),
        Ellipsoid((0, 0, -40), (a - fat, b - fat, 415), "muscle"),
    ]
    for side in (-1.0, 1.0):
        e += [
            Ellipsoid((side * (a + 32), 10, -20), (30, 34, 300), "skin"),
            Ellipsoid((side * (a + 32), 10, -20), (26, 30, 296), "muscle"),
            Ellipsoid((side * (a + 32), 10, 40), (9, 9, 200), "bone"),
            Ellipsoid((side * (a + 32), 10, 40), (5, 5, 195), "marrow"),
        ]
    ribs = np.linspace(-150, 125, 10)
    for i, z in enumerate(ribs):
        taper = 0.72 + 0.28 * math.sin(math.pi * (i + 1.5) / (len(ribs) + 1))
        e.append(Ellipsoid((0, 6, float(z)), ((a - fat - 4) * taper, b - fat - 6, 6), "bone", tilt=-0.38))
    e += [
        Ellipsoid((0, 0, -10), (a - fat - 18, b - fat - 16, 185), "soft"),
        Ellipsoid((-62, 5, -5), (_jit(rng, 60), _jit(rng, 74), _jit(rng, 140)), "lung"),
        Ellipsoid((62, 5, -5), (_jit(rng, 58), _jit(rng, 74), _jit(rng, 140)), "lung"),
        Ellipsoid((22, -20, -70), (_jit(rng, 52), _jit(rng, 42), 60), "myocardium", 0.5),
        Ellipsoid((22, -20, -70), (32, 26, 42), "blood", 0.5),
        Ellipsoid((-8, 22, 20), (12, 12, 150), "blood"),
        Ellipsoid((-60, -10, -200), (90, 80, 50), "liver"),
        Ellipsoid((0, 62, -40), (18, 17, 420), "bone"),
        Ellipsoid((0, 60, -40), (13, 12, 420), "marrow"),
        Ellipsoid((0, 84, -40), (5, 6, 420), "csf"),
        Ellipsoid((0, -b + fat + 10, -20), (13, 6, 80), "bone"),
        Ellipsoid((-65, -35, 160), (75, 7, 7), "bone", 0.12),
        Ellipsoid((65, -35, 160), (75, 7, 7), "bone", -0.12),
    ]
    if rng.random() < 0.4:
        side = rng.choice([-1.0, 1.0])
        e.append(
            Ellipsoid(
                (side * rng.uniform(45, 80), rng.uniform(-20, 40), rng.uniform(-60, 60)),
                (10, 10, 10),
                "lesion",
            )
        )
    return Phantom("chest", tuple(e), (-130.0, 110.0), (380.0, 380.0), "axial", "y")


def abdomen(rng: np.random.Generator) -> Phantom:
    """Axial abdomen: liver, spleen, kidneys, aorta, vertebra and gas-filled bowel loops."""
    a, b = _jit(rng, 160), _jit(rng, 115)
    fat = rng.uniform(10.0, 40.0)
    e = [
        Ellipsoid((0, 0, 0), (a, b, 200), "skin"),
        Ellipsoid((0, 0, 0), (a - 2, b - 2, 198), "fat"),
        Ellipsoid((0, 0, 0), (a - fat, b - fat, 195), "soft"),
        Ellipsoid((-60, -5, 40), (_jit(rng, 75), _jit(rng, 70), 90), "liver", 0.3),
        Ellipsoid((80, 25, 50), (_jit(rng, 35), _jit(rng, 50), 60), "spleen", -0.4),
        Ellipsoid((-55, 45, -20), (_jit(rng, 25), 38, 55), "kidney", 0.5),
        Ellipsoid((55, 45, -15), (_jit(rng, 25), 38, 55), "kidney", -0.5),
        Ellipsoid((-10, 30, 0), (10, 10, 200), "blood"),
        Ellipsoid((0, 70, 0), (22, 20, 200), "bone"),
        Ellipsoid((0, 68, 0), (17, 15, 200), "marrow"),
        Ellipsoid((0, 95, 0), (6, 7, 200), "csf"),
        Ellipsoid((-40, 80, 0), (20, 18, 200), "muscle"),
        Ellipsoid((40, 80, 0), (20, 18, 200), "muscle"),
    ]
    for _ in range(int(rng.integers(3, 9))):
        e.append(
            Ellipsoid(
                (rng.uniform(-70, 70), rng.uniform(-70, 10), rng.uniform(-80, 40)),
                (rng.uniform(8, 22), rng.uniform(6, 16), rng.uniform(10, 30)),
                "gas" if rng.random() < 0.6 else "fluid",
                rng.uniform(0, math.pi),
            )
        )
    return Phantom("abdomen", tuple(e), (-70.0, 90.0), (380.0, 380.0), "axial", "y")


def pelvis(rng: np.random.Generator) -> Phantom:
    """Axial pelvis: iliac wings, sacrum, femoral heads, bladder, rectal gas, gluteal muscle."""
    a, b = _jit(rng, 175), _jit(rng, 120)
    fat = rng.uniform(10.0, 40.0)
    e = [
        Ellipsoid((0, 0, 0), (a, b, 200), "skin"),
        Ellipsoid((0, 0, 0), (a - 2, b - 2, 198), "fat"),
        Ellipsoid((0, 0, 0), (a - fat, b - fat, 195), "muscle"),
        Ellipsoid((0, -5, 0), (a - fat - 25, b - fat - 30, 190), "soft"),
        Ellipsoid((-85, 30, 40), (20, 60, 60), "bone", 0.5),
        Ellipsoid((85, 30, 40), (20, 60, 60), "bone", -0.5),
        Ellipsoid((-85, 30, 40), (13, 52, 52), "marrow", 0.5),
        Ellipsoid((85, 30, 40), (13, 52, 52), "marrow", -0.5),
        Ellipsoid((0, 75, 30), (32, 18, 70), "bone"),
        Ellipsoid((0, 75, 30), (25, 12, 65), "marrow"),
        Ellipsoid((-95, 5, -50), (25, 25, 25), "bone"),
        Ellipsoid((95, 5, -50), (25, 25, 25), "bone"),
        Ellipsoid((-95, 5, -50), (19, 19, 19), "marrow"),
        Ellipsoid((95, 5, -50), (19, 19, 19), "marrow"),
        Ellipsoid((-100, 8, -125), (15, 15, 75), "bone"),
        Ellipsoid((100, 8, -125), (15, 15, 75), "bone"),
        Ellipsoid((-100, 8, -125), (10, 10, 72), "marrow"),
        Ellipsoid((100, 8, -125), (10, 10, 72), "marrow"),
        Ellipsoid((-22, -75, -45), (18, 10, 22), "bone", 0.3),
        Ellipsoid((22, -75, -45), (18, 10, 22), "bone", -0.3),
        Ellipsoid((0, -25, -30), (_jit(rng, 45, 0.3), _jit(rng, 35, 0.3), _jit(rng, 35, 0.3)), "urine"),
        Ellipsoid((0, 45, -10), (rng.uniform(8, 18), rng.uniform(8, 15), 40), "gas"),
    ]
    return Phantom("pelvis", tuple(e), (-80.0, 80.0), (400.0, 400.0), "axial", "y")


def knee(rng: np.random.Generator) -> Phantom:
    """Sagittal knee (z runs left-right): femur above tibia, marrow, cartilage, patella, fat pad."""
    r = _jit(rng, 55)
    gap = rng.uniform(4.0, 8.0)
    e = [
        Ellipsoid((0, 0, 0), (r, 220, r * 0.9), "skin"),
        Ellipsoid((0, 0, 0), (r - 2, 218, r * 0.9 - 2), "fat"),
        Ellipsoid((5, 0, 0), (r - 12, 215, r * 0.9 - 12), "muscle"),
        Ellipsoid((-10, -10, 0), (r * 0.45, 30, 30), "fat"),
        Ellipsoid((2, -90, 0), (27, 100, 27), "bone"),
        Ellipsoid((2, -90, 0), (22, 97, 22), "marrow"),
        Ellipsoid((2, -gap - 3, 0), (34, 18, 38), "cartilage"),
        Ellipsoid((2, -gap - 8, 0), (31, 16, 35), "bone"),
        Ellipsoid((2, -gap - 8, 0), (27, 13, 31), "marrow"),
        Ellipsoid((2, gap + 3, 0), (34, 14, 38), "cartilage"),
        Ellipsoid((2, 95, 0), (27, 95, 30), "bone"),
        Ellipsoid((2, 95, 0), (22, 92, 25), "marrow"),
        Ellipsoid((-r + 10, -25, 0), (7, 20, 18), "bone", 0.2),
        Ellipsoid((-r + 10, -25, 0), (4, 16, 14), "marrow", 0.2),
        Ellipsoid((2, 0, 0), (30, gap, 30), "fluid"),
        Ellipsoid((14, 110, 30), (7, 85, 7), "bone"),
        Ellipsoid((14, 110, 30), (4, 82, 4), "marrow"),
    ]
    return Phantom("knee", tuple(e), (-40.0, 40.0), (200.0, 200.0), "sagittal", "x")


def spine(rng: np.random.Generator) -> Phantom:
    """Sagittal lumbar spine (z runs left-right): vertebral bodies, discs, canal, cord, back muscles."""
    e = [
        Ellipsoid((0, 0, 0), (150, 260, 170), "skin"),
        Ellipsoid((0, 0, 0), (148, 258, 168), "fat"),
        Ellipsoid((10, 0, 0), (125, 250, 150), "soft"),
        Ellipsoid((95, 0, 0), (35, 250, 70), "muscle"),
    ]
    height = _jit(rng, 30)
    disc = rng.uniform(7.0, 12.0)
    pitch = height + disc
    lordosis = rng.uniform(-0.002, 0.004)
    for k in range(-4, 5):
        y = k * pitch
        x = 20 + lordosis * y * y
        e += [
            Ellipsoid((x, y, 0), (22, height / 2, 25), "bone"),
            Ellipsoid((x, y, 0), (19, height / 2 - 2.5, 22), "marrow"),
            Ellipsoid((x, y + pitch / 2, 0), (21, disc / 2, 23), "disc"),
            Ellipsoid((x + 60, y, 0), (14, 9, 6), "bone", 0.3),
        ]
    e += [
        Ellipsoid((52, 0, 0), (9, 250, 10), "csf"),
        Ellipsoid((52, -60, 0), (4, 120, 5), "cord"),
        Ellipsoid((-30, 0, 0), (10, 250, 10), "blood"),
    ]
    return Phantom("spine", tuple(e), (-25.0, 25.0), (320.0, 320.0), "sagittal", "z")


def whole_body(rng: np.random.Generator) -> Phantom:
    """Coronal whole body (z runs front to back): head to thighs with the organs PET lights up."""
    w = _jit(rng, 1.0, 0.08)
    e = [
        Ellipsoid((0, -370, 0), (75 * w, 92, 85), "soft"),
        Ellipsoid((0, -370, 0), (62 * w, 78, 72), "brain_gm"),
        Ellipsoid((0, -370, 0), (45 * w, 58, 55), "brain_wm"),
        Ellipsoid((0, -265, 0), (45 * w, 40, 45), "soft"),
        Ellipsoid((0, -20, 0), (170 * w, 240, 110), "soft"),
        Ellipsoid((-240 * w, -40, 0), (35, 220, 35), "muscle"),
        Ellipsoid((240 * w, -40, 0), (35, 220, 35), "muscle"),
        Ellipsoid((-70 * w, -110, 0), (55 * w, 110, 65), "lung"),
        Ellipsoid((70 * w, -110, 0), (55 * w, 110, 65), "lung"),
        Ellipsoid((20, -80, -20), (45, 45, 40), "myocardium", 0.5),
        Ellipsoid((20, -80, -20), (26, 26, 24), "blood", 0.5),
        Ellipsoid((-60, 20, 0), (_jit(rng, 75), 60, 70), "liver"),
        Ellipsoid((80, 10, 20), (30, 45, 35), "spleen"),
        Ellipsoid((-50, 60, 40), (22, 40, 22), "kidney"),
        Ellipsoid((50, 60, 40), (22, 40, 22), "kidney"),
        Ellipsoid((0, 190, -20), (_jit(rng, 35, 0.3), _jit(rng, 30, 0.3), 30), "urine"),
        Ellipsoid((-80 * w, 430, 0), (65, 210, 65), "muscle"),
        Ellipsoid((80 * w, 430, 0), (65, 210, 65), "muscle"),
        Ellipsoid((0, 0, 70), (15, 240, 15), "marrow"),
    ]
    for _ in range(int(rng.integers(0, 4))):
        e.append(
            Ellipsoid(
                (rng.uniform(-120, 120), rng.uniform(-200, 200), rng.uniform(-50, 50)), (12, 12, 12), "lesion"
            )
        )
    return Phantom("whole_body", tuple(e), (-60.0, 60.0), (620.0, 1000.0), "coronal", "z")


def hand(rng: np.random.Generator) -> Phantom:
    """Hand seen palm down (beam along z): carpals, metacarpals and phalanges inside soft-tissue fingers."""
    e = [
        Ellipsoid((0, 120, 0), (34, 60, 22), "soft"),  # wrist and forearm
        Ellipsoid((0, 40, 0), (48, 55, 16), "soft"),  # palm
        Ellipsoid((-10, 130, 0), (9, 60, 9), "bone"),
        Ellipsoid((14, 130, 0), (7, 60, 7), "bone"),
    ]
    spread = rng.uniform(0.05, 0.22)
    bones = []
    for i, (x0, length) in enumerate(((-38, 60), (-20, 85), (0, 95), (19, 88), (36, 70))):
        angle = (i - 2) * spread + (0.6 if i == 0 else 0.0)
        direction = (math.sin(angle), -math.cos(angle))
        base_x, base_y = x0 * 0.9, 30.0 - (20 if i == 0 else 0)
        e.append(
            Ellipsoid(
                (base_x + direction[0] * 55, base_y + direction[1] * 55, 0),
                (9, length / 2 + 10, 9),
                "soft",
                angle,
            )
        )
        bones.append(Ellipsoid((base_x, base_y, 0), (4.5, 28, 5), "bone", angle))  # metacarpal
        seg_start = 33.0
        for k, seg in enumerate((length * 0.45, length * 0.3, length * 0.25)):
            if i == 0 and k == 2:
                break
            centre = seg_start + seg / 2
            bones.append(
                Ellipsoid(
                    (base_x + direction[0] * centre, base_y + direction[1] * centre, 0),
                    (4.0, seg / 2 - 1.5, 4.5),
                    "bone",
                    angle,
                )
            )
            seg_start += seg
    for j in range(8):
        bones.append(Ellipsoid((-24 + 7 * j, 75 + 6 * (j % 2), 0), (5, 5, 6), "bone"))
    return Phantom("hand", tuple(e + bones), (-10.0, 10.0), (220.0, 280.0), "coronal", "z")


def breast(rng: np.random.Generator) -> Phantom:
    """Compressed breast (beam along z): fat with glandular blobs and the odd calcification."""
    depth, half_h = _jit(rng, 150, 0.15), _jit(rng, 115, 0.12)
    e = [
        Ellipsoid((-120, 0, 0), (depth, half_h, 60), "skin"),
        Ellipsoid((-120, 0, 0), (depth - 2, half_h - 2, 58), "fat"),
    ]
    density = rng.uniform(0.2, 1.0)
    for _ in range(int(20 + 40 * density)):
        e.append(
            Ellipsoid(
                (
                    -120 + rng.uniform(5, depth * 0.8),
                    rng.uniform(-half_h * 0.6, half_h * 0.6),
                    rng.uniform(-15, 15),
                ),
                (rng.uniform(4, 18), rng.uniform(3, 10), rng.uniform(3, 10)),
                "glandular",
                rng.uniform(-0.6, 0.6),
            )
        )
    for _ in range(int(rng.integers(0, 6))):
        e.append(
            Ellipsoid(
                (-120 + rng.uniform(20, depth * 0.7), rng.uniform(-50, 50), 0),
                (0.8, 0.8, 0.8),
                "calcification",
            )
        )
    return Phantom("breast", tuple(e), (-20.0, 20.0), (240.0, 300.0), "coronal", "z")


BODY_PARTS = {
    "head": head,
    "chest": chest,
    "abdomen": abdomen,
    "pelvis": pelvis,
    "knee": knee,
    "spine": spine,
    "whole_body": whole_body,
    "hand": hand,
    "breast": breast,
}


def make_phantom(body_part: str, rng: np.random.Generator) -> Phantom:
    """One patient's phantom of ``body_part`` with organ-level and whole-body variation drawn from ``rng``."""
    try:
        builder = BODY_PARTS[body_part]
    except KeyError:
        raise ValueError(f"no phantom for body part {body_part!r}; known: {sorted(BODY_PARTS)}") from None
    return vary_patient(builder(rng), rng)


# ---------------------------------------------------------------------------------------------------
# Image-domain helpers
# ---------------------------------------------------------------------------------------------------


def _fast_fft_length(n: int) -> int:
    """Smallest length >= n with only factors 2, 3 and 5 (pocketfft is slow on large prime factors)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _blur_axis_direct(img: np.ndarray, sigma_px: float, axis: int) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma_px))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps /= taps.sum()
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    padded = np.pad(img, pad, mode="reflect")
    n = img.shape[axis]
    out = np.zeros_like(img)
    for k, weight in enumerate(taps):
        out += weight * (padded[k : k + n] if axis == 0 else padded[:, k : k + n])
    return out


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian blur with reflective borders: direct separable taps when narrow, FFT when wide."""
    img = img.astype(np.float32)
    if sigma_px <= 0:
        return img.copy()
    if sigma_px <= 2.0:
        return _blur_axis_direct(_blur_axis_direct(img, sigma_px, 0), sigma_px, 1)
    pad = math.ceil(3 * sigma_px)
    padded = np.pad(img, pad, mode="reflect")
    shape = (_fast_fft_length(padded.shape[0]), _fast_fft_length(padded.shape[1]))
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fx**2 + fy**2))
    out = np.fft.irfft2(np.fft.rfft2(padded, s=shape) * transfer, s=shape)
    return out[pad : pad + img.shape[0], pad : pad + img.shape[1]].astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random texture (tissue heterogeneity, MR bias, film mottle).

    Drawn on a grid ``sigma_px`` times coarser and interpolated up: the same correlation length as
    blurring full-resolution noise, at a fraction of the cost.
    """
    step = max(1.0, sigma_px)
    coarse_shape = (math.ceil(shape[0] / step) + 2, math.ceil(shape[1] / step) + 2)
    coarse = gaussian_blur(rng.standard_normal(coarse_shape).astype(np.float32), 0.8)
    field = resize_bilinear(coarse, shape[0], shape[1])
    return (field - field.mean()) / (field.std() + 1e-6)


def resize_bilinear(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize with pixel-centre alignment; used to bring coarse projections to detector size."""
    in_r, in_c = img.shape
    r = np.clip((np.arange(rows) + 0.5) * in_r / rows - 0.5, 0, in_r - 1)
    c = np.clip((np.arange(cols) + 0.5) * in_c / cols - 0.5, 0, in_c - 1)
    r0, c0 = np.floor(r).astype(int), np.floor(c).astype(int)
    r1, c1 = np.minimum(r0 + 1, in_r - 1), np.minimum(c0 + 1, in_c - 1)
    wr, wc = (r - r0)[:, None], (c - c0)[None, :]
    top = img[r0][:, c0] * (1 - wc) + img[r0][:, c1] * wc
    bottom = img[r1][:, c0] * (1 - wc) + img[r1][:, c1] * wc
    return (top * (1 - wr) + bottom * wr).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Modality renderers: tissue labels -> physical units
# ---------------------------------------------------------------------------------------------------


def render_ct(
    labels: np.ndarray, rng: np.random.Generator, noise_hu: float, couch: np.ndarray | None = None
) -> np.ndarray:
    """Hounsfield units: tissue values, mild texture, partial-volume blur and quantum noise.

    ``couch`` (HU, NaN elsewhere) is drawn into the air around the patient before blur and noise.
    """
    hu = CT_HU[labels]
    body = labels != TISSUE_INDEX["air"]
    if couch is not None:
        hu = np.where(~body & np.isfinite(couch), couch, hu)
    hu = hu + body * smooth_field(rng, labels.shape, 3.0) * 6.0
    hu = gaussian_blur(hu, 0.7)
    hu = hu + np.float32(noise_hu) * rng.standard_normal(labels.shape, dtype=np.float32)
    return np.clip(hu, -1024.0, 3071.0)


def render_mr(
    labels: np.ndarray, rng: np.random.Generator, weighting: str, scale: float, noise: float
) -> np.ndarray:
    """Arbitrary MR signal: T1, T2 or fat-suppressed T2 contrast, coil bias field, Rician noise floor."""
    table = {"T1": MR_T1, "T2": MR_T2, "T2FS": MR_T2_FAT_SAT}[weighting]
    signal = table[labels] * (1.0 + 0.06 * smooth_field(rng, labels.shape, 2.5))
    signal = gaussian_blur(signal, 0.8)
    rows, cols = labels.shape
    yy = np.linspace(-1, 1, rows, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, cols, dtype=np.float32)[None, :]
    gx, gy, gc = rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    bias = np.exp(gx * xx + gy * yy + gc * (xx**2 + yy**2))
    signal = signal * bias * np.float32(scale)
    sigma = np.float32(noise * scale)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def render_pet(
    labels: np.ndarray, rng: np.random.Generator, spacing: float, bq_per_suv: float, counts_per_suv: float
) -> np.ndarray:
    """Activity concentration (Bq/ml): hot organs, scanner blur (~7 mm FWHM) and Poisson counting noise."""
    suv = PET_SUV[labels] * rng.uniform(0.8, 1.2)
    sigma_px = 7.0 / 2.355 / spacing
    suv = gaussian_blur(suv, sigma_px)
    counts = rng.poisson(np.clip(suv, 0, None) * counts_per_suv).astype(np.float32)
    suv = gaussian_blur(counts / counts_per_suv, 0.6)
    return np.clip(suv, 0, None) * bq_per_suv


def render_radiograph(
    line_integral: np.ndarray, rng: np.random.Generator, photons: float, gamma: float
) -> np.ndarray:
    """Presentation-ready radiograph in [0, 1] (bone bright): quantum noise, log, contrast curve.

    A detector sees exp(-line integral); display processing takes the log back and compresses the
    wide dynamic range, which is why bone is bright and air dark in MONOCHROME2.
    """
    transmitted = np.exp(-line_integral)
    noisy = rng.poisson(transmitted * photons).astype(np.float32) / photons
    log_signal = -np.log(np.clip(noisy, 0.5 / photons, None))
    log_signal = gaussian_blur(log_signal, 0.6)
    top = float(np.percentile(log_signal, 99.8)) + 1e-3
    present = np.clip(log_signal / top, 0.0, 1.0) ** gamma
    return present.astype(np.float32)


def collimate(
    present: np.ndarray, rng: np.random.Generator, mode: str, max_margin: float = 0.12
) -> np.ndarray:
    """Mask a random border as collimator blades (``white``: unexposed) or a display shutter (``black``).

    ``none`` leaves the image as exposed; the three happen in real exports, so a border colour is no
    shortcut to the class.
    """
    if mode == "none":
        return present
    rows, cols = present.shape
    top, bottom = (rng.uniform(0.02, max_margin, size=2) * rows).astype(int)
    left, right = (rng.uniform(0.02, max_margin, size=2) * cols).astype(int)
    out = np.full_like(present, 0.97 if mode == "white" else 0.0)
    out[top : rows - bottom, left : cols - right] = present[top : rows - bottom, left : cols - right]
    return out


def burn_in_marker(present: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A saturated side marker ("L"/"R" lead letter) in a random corner, as on most radiographs."""
    rows, cols = present.shape
    size = max(4, int(min(rows, cols) * rng.uniform(0.03, 0.06)))
    r = int(rng.uniform(0.04, 0.2) * rows)
    c = (
        int(rng.uniform(0.04, 0.2) * cols)
        if rng.random() < 0.5
        else cols - size - int(rng.uniform(0.04, 0.2) * cols)
    )
    out = present.copy()
    out[r : r + size, c : c + max(2, size // 3)] = 1.0  # the upright stroke of an "L"
    out[r + size - max(2, size // 3) : r + size, c : c + size] = 1.0
    return out


def couch_hu(rows: int, cols: int, spacing: float, top_y: float, rng: np.random.Generator) -> np.ndarray:
    """The patient table in an axial CT slice: NaN off the couch, else its HU (carbon shells, foam core).

    The table sits ``top_y`` mm below the isocentre and curves up at the edges like a cradle.
    """
    ys = pixel_centres(rows, spacing)[:, None]
    xs = pixel_centres(cols, spacing)[None, :]
    radius = rng.uniform(500.0, 900.0)
    depth = ys - (top_y - xs**2 / (2 * radius))
    inside = np.abs(xs) <= rng.uniform(200.0, 240.0)
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    shell = 4.0
    core = rng.uniform(20.0, 35.0)
    out[inside & (depth >= 0) & (depth < shell)] = 150.0
    out[inside & (depth >= shell) & (depth < shell + core)] = -850.0
    out[inside & (depth >= shell + core) & (depth < 2 * shell + core)] = 150.0
    return out
