"""Synthetic abdominal CT phantom with liver lesions.

A case is drawn in a patient frame (millimetres, ``+x`` patient right, ``+y`` anterior, ``+z`` superior,
origin at the body centre of the mid-liver slice) and sampled on a canonical RAS voxel grid: axis 0 runs to the
patient's right, axis 1 anteriorly, axis 2 superiorly. :func:`render_phantom` returns the arrays and their
affine; writing them in another orientation is left to :mod:`custom.data.synthetic`.

Anatomy: body outline with subcutaneous fat, abdominal wall and paraspinal muscle, ribs, vertebra with discs
and spinal canal, aorta, inferior vena cava, liver (right and left lobe, hepatic and portal veins placed on the
planes that :mod:`custom.data.geometry` uses for the Couinaud regions), gallbladder, spleen on the patient's
left, kidneys, psoas, stomach and bowel loops with gas, lung bases and heart above the diaphragm, CT table.
Contrast phase (arterial, portal venous, delayed) sets organ and vessel enhancement; the image gets partial
volume blur and spatially correlated noise.

Lesion kinds and their CT appearance:

* ``cyst``: near water (0-15 HU), homogeneous, sharp round margin;
* ``metastasis``: hypodense solid core (30-60 HU, below the liver), lobulated margin, enhancing rim from
  12 mm up and a darker necrotic centre from 25 mm up;
* ``hyperdense``: 45-90 HU above the liver, homogeneous, smooth margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from monai.transforms.utils import get_largest_connected_component_mask
from scipy import ndimage

from .geometry import CANTLIE_FRACTION, FALCIFORM_FRACTION, PORTAL_FRACTION, RIGHT_SECTOR_FRACTION

__all__ = ["LESION_KINDS", "PHASES", "PhantomOptions", "Phantom", "render_phantom"]

LESION_KINDS = ("cyst", "metastasis", "hyperdense")
PHASES = ("arterial", "portal_venous", "delayed")

AIR_HU = -1000.0
FAT_HU = -100.0


@dataclass
class PhantomOptions:
    """Sampling ranges of a synthetic case (all lengths in mm)."""

    spacing_xy: tuple[float, float] = (1.3, 1.5)
    slice_thickness: tuple[float, ...] = (3.0, 4.0, 5.0)
    lesion_count_weights: tuple[float, ...] = (0.1, 0.15, 0.2, 0.2, 0.15, 0.1, 0.1)
    kind_weights: tuple[float, float, float] = (0.35, 0.4, 0.25)
    diameter_range: dict = field(
        default_factory=lambda: {"cyst": (5.0, 45.0), "metastasis": (8.0, 60.0), "hyperdense": (6.0, 40.0)}
    )
    touching_probability: float = 0.2
    phase_weights: tuple[float, float, float] = (0.25, 0.55, 0.2)
    noise_hu: tuple[float, float] = (8.0, 16.0)


@dataclass
class Phantom:
    """One rendered case in canonical RAS voxel order.

    ``image`` (H, W, D) int16 HU; ``lesions`` (H, W, D) uint8 instance map; ``liver`` (H, W, D) uint8 mask that
    includes the lesions; ``affine`` 4x4 voxel-to-RAS; ``kinds`` lesion id -> kind; ``phase`` contrast phase.
    """

    image: np.ndarray
    lesions: np.ndarray
    liver: np.ndarray
    affine: np.ndarray
    kinds: dict[int, str]
    phase: str


class Grid:
    """Axis-aligned sampling grid: 1D patient-frame coordinates (mm) of voxel centres along x, y, z."""

    def __init__(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray):
        self.axes = (xs, ys, zs)
        self.shape = (len(xs), len(ys), len(zs))

    def box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie in the world box [lo, hi]."""
        return tuple(
            slice(int(np.searchsorted(a, low, "left")), int(np.searchsorted(a, high, "right")))
            for a, low, high in zip(self.axes, lo, hi)
        )

    def coords(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (n,1,1), (1,m,1), (1,1,k) coordinate arrays of a box."""
        xs, ys, zs = (a[s] for a, s in zip(self.axes, box))
        return xs[:, None, None], ys[None, :, None], zs[None, None, :]


def rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def ellipsoid_on_box(grid: Grid, box, centre, radii, rotation=None):
    """Normalised radius q (< 1 inside) of an ellipsoid on a given box; returns (q, coordinates in its own frame)."""
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, float)
    x, y, z = grid.coords(box)
    d = (x - centre[0], y - centre[1], z - centre[2])
    local = [rotation[0, k] * d[0] + rotation[1, k] * d[1] + rotation[2, k] * d[2] for k in range(3)]
    return np.sqrt(sum((u / r) ** 2 for u, r in zip(local, radii))), local


def ellipsoid_radius(grid: Grid, centre, radii, rotation=None, pad: float = 1.0):
    """Normalised radius q (< 1 inside) of an ellipsoid on its bounding box; returns (box, q, local coords)."""
    centre = np.asarray(centre, float)
    radii = np.asarray(radii, float)
    rotation = np.eye(3) if rotation is None else np.asarray(rotation, float)
    half = np.abs(rotation) @ radii * pad
    box = grid.box(centre - half, centre + half)
    q, local = ellipsoid_on_box(grid, box, centre, radii, rotation)
    return box, q, local


def capsule_mask(grid: Grid, start, end, radius_start: float, radius_end: float, box=None):
    """Tube from ``start`` to ``end`` with linearly varying radius; returns (box, mask) on ``box`` or its own box."""
    start, end = np.asarray(start, float), np.asarray(end, float)
    r = max(radius_start, radius_end)
    if box is None:
        box = grid.box(np.minimum(start, end) - r, np.maximum(start, end) + r)
    x, y, z = grid.coords(box)
    axis = end - start
    length2 = max(float(axis @ axis), 1e-6)
    d = (x - start[0], y - start[1], z - start[2])
    t = np.clip((d[0] * axis[0] + d[1] * axis[1] + d[2] * axis[2]) / length2, 0.0, 1.0)
    dist2 = sum((d[k] - t * axis[k]) ** 2 for k in range(3))
    return box, dist2 <= (radius_start + t * (radius_end - radius_start)) ** 2


def smooth_field(rng: np.random.Generator, shape, cells: int = 6) -> np.ndarray:
    """Smooth random field in [-1, 1]-ish with about ``cells`` bumps along the longest axis."""
    coarse_shape = tuple(max(2, int(np.ceil(cells * s / max(shape)))) + 1 for s in shape)
    coarse = rng.uniform(-1.0, 1.0, coarse_shape).astype(np.float32)
    zoom = [s / c for s, c in zip(shape, coarse_shape)]
    return ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)[: shape[0], : shape[1], : shape[2]]


@dataclass
class Contrast:
    """HU of enhancing tissues in one contrast phase."""

    liver: float
    aorta: float
    portal_vein: float
    hepatic_vein: float
    ivc: float
    spleen: float
    kidney_cortex: float
    kidney_medulla: float
    muscle: float
    bowel_wall: float


def sample_contrast(rng: np.random.Generator, phase: str) -> Contrast:
    if phase == "arterial":
        liver = rng.uniform(70, 85)
        return Contrast(
            liver,
            rng.uniform(250, 350),
            rng.uniform(120, 160),
            rng.uniform(35, 50),
            rng.uniform(60, 90),
            rng.uniform(110, 130),
            rng.uniform(180, 220),
            rng.uniform(90, 110),
            rng.uniform(45, 55),
            rng.uniform(70, 90),
        )
    if phase == "portal_venous":
        liver = rng.uniform(100, 125)
        return Contrast(
            liver,
            rng.uniform(150, 200),
            liver + rng.uniform(35, 55),
            liver + rng.uniform(25, 45),
            rng.uniform(120, 150),
            liver + rng.uniform(5, 15),
            rng.uniform(160, 190),
            rng.uniform(150, 180),
            rng.uniform(50, 60),
            rng.uniform(60, 80),
        )
    liver = rng.uniform(85, 100)
    return Contrast(
        liver,
        rng.uniform(110, 140),
        liver + rng.uniform(10, 20),
        liver + rng.uniform(10, 20),
        rng.uniform(110, 130),
        liver + rng.uniform(0, 10),
        rng.uniform(130, 150),
        rng.uniform(140, 160),
        rng.uniform(50, 60),
        rng.uniform(55, 70),
    )


class PhantomBuilder:
    """Paints one case: anatomy first, then lesions, then blur and noise (see :func:`render_phantom`)."""

    def __init__(self, rng: np.random.Generator, options: PhantomOptions):
        self.rng = rng
        self.options = options
        self.phase = str(rng.choice(PHASES, p=options.phase_weights))
        self.contrast = sample_contrast(rng, self.phase)
        self.body_a = rng.uniform(145, 175)
        self.body_b = rng.uniform(100, 125)
        self.fat = rng.uniform(8, 30)
        self.muscle_wall = rng.uniform(6, 12)
        self.cavity_centre_y = 0.12 * self.body_b
        self.cavity_a = self.body_a - self.fat - self.muscle_wall
        self.cavity_b = 0.88 * self.body_b - self.fat - self.muscle_wall
        self.liver_height = rng.uniform(120, 150)
        self.grid = self._make_grid()
        self.hu = np.full(self.grid.shape, AIR_HU, np.float32)
        self.liver = np.zeros(self.grid.shape, bool)
        self.lesions = np.zeros(self.grid.shape, np.uint8)
        self.kinds: dict[int, str] = {}

    # ---------------------------------------------------------------- grid
    def _make_grid(self) -> Grid:
        spacing = self.rng.uniform(*self.options.spacing_xy)
        thickness = float(self.rng.choice(self.options.slice_thickness))
        margin = 10.0
        x_half = self.body_a + margin
        y_lo, y_hi = -self.body_b - 25.0, self.body_b + margin  # the table lies behind the patient
        z_lo = -0.55 * self.liver_height - margin
        z_hi = 0.6 * self.liver_height + margin
        nx = int(np.ceil(2 * x_half / spacing))
        ny = int(np.ceil((y_hi - y_lo) / spacing))
        nz = int(np.ceil((z_hi - z_lo) / thickness))
        xs = -x_half + spacing * np.arange(nx)
        ys = y_lo + spacing * np.arange(ny)
        zs = z_lo + thickness * np.arange(nz)
        self.spacing = (spacing, spacing, thickness)
        return Grid(xs, ys, zs)

    def affine(self) -> np.ndarray:
        """Voxel-to-RAS affine; the patient sits off the scanner isocentre like on a real table."""
        offset = np.array([self.rng.uniform(-15, 15), self.rng.uniform(-30, 30), self.rng.uniform(-350, -50)])
        affine = np.diag([*self.spacing, 1.0])
        affine[:3, 3] = np.array([a[0] for a in self.grid.axes]) + offset
        return affine

    # ---------------------------------------------------------------- helpers
    def paint(self, box, mask, value) -> None:
        region = self.hu[box]
        if np.ndim(value) == 0:
            region[mask] = value
        else:
            region[mask] = np.broadcast_to(value, mask.shape)[mask]

    def in_ellipse(self, x, y, a, b, cy=0.0):
        return (x / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0

    def cavity(self, box, shrink: float = 0.0):
        x, y, _ = self.grid.coords(box)
        inside = self.in_ellipse(x, y, self.cavity_a - shrink, self.cavity_b - shrink, self.cavity_centre_y)
        return np.broadcast_to(inside, tuple(s.stop - s.start for s in box))

    def full_box(self):
        return tuple(slice(0, n) for n in self.grid.shape)

    # ---------------------------------------------------------------- anatomy
    def draw_body(self) -> None:
        box = self.full_box()
        x, y, z = self.grid.coords(box)
        taper = 1.0 + 0.03 * z / self.liver_height
        body = self.in_ellipse(x, y, self.body_a * taper, np.where(y < 0, 0.95, 1.0) * self.body_b * taper)
        inner = self.in_ellipse(x, y, self.body_a * taper - self.fat, (self.body_b - self.fat) * taper)
        table = (np.abs(x) < self.body_a * 0.9) & (y > -self.body_b - 20) & (y < -self.body_b - 8)
        shape = self.grid.shape
        self.paint(box, np.broadcast_to(table & ~body, shape), 250.0)
        self.paint(box, np.broadcast_to(body, shape), FAT_HU + self.rng.uniform(-10, 10))
        self.paint(box, np.broadcast_to(inner, shape), self.contrast.muscle)
        self.paint(box, self.cavity(box), FAT_HU + 10 + self.rng.uniform(-10, 10))

    def draw_spine(self) -> None:
        self.vertebra_r = self.rng.uniform(17, 21)
        self.vertebra_y = self.cavity_centre_y - self.cavity_b + self.vertebra_r + 2
        box = self.full_box()
        x, y, z = self.grid.coords(box)
        shape = self.grid.shape
        r = np.sqrt(x**2 + (y - self.vertebra_y) ** 2)
        disc_phase = np.mod(z + self.rng.uniform(0, 32), 32.0)
        disc = disc_phase < 8.0
        self.paint(box, np.broadcast_to(r <= self.vertebra_r, shape), 650.0)
        body_inner = np.broadcast_to(r <= self.vertebra_r - 1.8, shape)
        self.paint(box, body_inner & np.broadcast_to(~disc, shape), self.rng.uniform(180, 260))
        self.paint(box, body_inner & np.broadcast_to(disc, shape), 90.0)
        canal_y = self.vertebra_y - self.vertebra_r - 9
        rc = np.sqrt(x**2 + (y - canal_y) ** 2)
        arch = (rc <= 14) & (y < canal_y + 6)
        spine_tip = -0.95 * self.body_b + self.fat + 4
        spinous = (np.abs(x) < 4) & (y < canal_y) & (y > spine_tip)
        transverse = (np.abs(x) < 35) & (np.abs(y - canal_y - 2) < 4) & (disc_phase > 14)
        self.paint(box, np.broadcast_to(arch | spinous, shape) | transverse, 450.0)
        self.paint(box, np.broadcast_to(rc <= 8.5, shape), 25.0)

    def draw_ribs(self) -> None:
        """Rib cross-sections in the lateral body wall, each over a short craniocaudal band."""
        ring_a = self.body_a - self.fat - 0.5 * self.muscle_wall
        ring_b = self.body_b - self.fat - 0.5 * self.muscle_wall
        for theta in np.radians([-45.0, -20.0, 5.0, 30.0, 55.0]):
            for side in (1, -1):
                z0 = self.rng.uniform(-0.3, 0.45) * self.liver_height
                self._rib((side * ring_a * np.cos(theta), ring_b * np.sin(theta), z0))

    def _rib(self, centre) -> None:
        box, q, _ = ellipsoid_radius(self.grid, centre, (6.0, 6.0, 9.0))
        if q.size:
            self.paint(box, (q <= 1.0) & ~self.cavity(box, -2.0), 550.0)

    def draw_vessels_outside_liver(self) -> None:
        ys = self.vertebra_y + self.vertebra_r
        self.aorta = (-self.rng.uniform(10, 20), ys + self.rng.uniform(11, 15), self.rng.uniform(10, 13))
        self.ivc = (self.rng.uniform(20, 28), ys + self.rng.uniform(16, 22), self.rng.uniform(10, 13))
        box = self.full_box()
        x, y, _ = self.grid.coords(box)
        shape = self.grid.shape
        ax, ay, ar = self.aorta
        self.paint(box, np.broadcast_to((x - ax) ** 2 + (y - ay) ** 2 <= ar**2, shape), self.contrast.aorta)
        self.ivc_mask = np.broadcast_to(
            ((x - self.ivc[0]) / 1.3) ** 2 + (y - self.ivc[1]) ** 2 <= self.ivc[2] ** 2, shape
        )

    def draw_kidneys_and_psoas(self) -> None:
        box = self.full_box()
        x, y, z = self.grid.coords(box)
        psoas_r = np.clip((-z - 0.15 * self.liver_height) * 0.3, 0, 22)
        for side in (1, -1):
            px = side * (self.vertebra_r + 14)
            psoas = (x - px) ** 2 + (y - self.vertebra_y - 4) ** 2 <= psoas_r**2
            self.paint(box, psoas, self.contrast.muscle)
        self.kidney_mask = np.zeros(self.grid.shape, bool)
        for side, z_fraction in ((1, -0.62), (-1, -0.5)):
            centre = (
                side * (self.vertebra_r + self.rng.uniform(45, 55)),
                self.vertebra_y + self.rng.uniform(0, 12),
                z_fraction * self.liver_height + self.rng.uniform(-8, 8),
            )
            radii = (self.rng.uniform(22, 27), self.rng.uniform(25, 30), self.rng.uniform(45, 55))
            rotation = rotation_z(side * self.rng.uniform(0.4, 0.7))
            kbox, q, local = ellipsoid_radius(self.grid, centre, radii, rotation)
            kidney = q <= 1.0
            self.kidney_mask[kbox] |= kidney
            self.paint(kbox, kidney, self.contrast.kidney_cortex)
            self.paint(kbox, q <= 0.62, self.contrast.kidney_medulla)
            sinus = (q <= 0.55) & (-side * local[0] > 0.2 * radii[0])
            self.paint(kbox, sinus, -40.0)

    def draw_spleen(self) -> None:
        centre = (
            -(self.cavity_a - self.rng.uniform(30, 40)),
            self.cavity_centre_y - 0.45 * self.cavity_b,
            self.rng.uniform(0.05, 0.2) * self.liver_height,
        )
        radii = (self.rng.uniform(22, 32), self.rng.uniform(45, 60), self.rng.uniform(40, 55))
        box, q, _ = ellipsoid_radius(self.grid, centre, radii, rotation_z(self.rng.uniform(0.5, 0.8)))
        spleen = (q <= 1.0) & self.cavity(box, 2.0)
        texture = 0.0 if self.phase != "arterial" else 18.0 * smooth_field(self.rng, q.shape, 5)
        self.paint(box, spleen, self.contrast.spleen + texture)
        self.upper_organs = np.zeros(self.grid.shape, bool)
        self.upper_organs[box] |= spleen

    def draw_stomach(self) -> None:
        centre = (
            -0.35 * self.cavity_a,
            self.cavity_centre_y + 0.05 * self.cavity_b,
            self.rng.uniform(0.2, 0.35) * self.liver_height,
        )
        radii = (self.rng.uniform(35, 50), self.rng.uniform(28, 40), self.rng.uniform(40, 55))
        box, q, local = ellipsoid_radius(self.grid, centre, radii, rotation_z(self.rng.uniform(-0.5, 0.0)))
        stomach = (q <= 1.0) & self.cavity(box, 3.0)
        self.paint(box, stomach, self.contrast.bowel_wall)
        lumen = stomach & (q <= 1.0 - 4.0 / min(radii))
        gas_level = self.rng.uniform(0.0, 0.6) * radii[1]
        _, y, _ = self.grid.coords(box)
        gas = lumen & np.broadcast_to(y - centre[1] > gas_level, lumen.shape)
        self.paint(box, lumen & ~gas, self.rng.uniform(5, 30))
        self.paint(box, gas, -950.0)
        self.upper_organs[box] |= stomach

    def draw_bowel(self) -> None:
        for _ in range(int(self.rng.integers(6, 15))):
            start = np.array(
                [
                    self.rng.uniform(-0.75, 0.75) * self.cavity_a,
                    self.cavity_centre_y + self.rng.uniform(-0.3, 0.8) * self.cavity_b,
                    self.rng.uniform(-0.6, 0.05) * self.liver_height,
                ]
            )
            end = start + self.rng.normal(0, 25, 3)
            radius = self.rng.uniform(8, 16)
            box, tube = capsule_mask(self.grid, start, end, radius, radius)
            if not tube.any():
                continue
            tube &= self.cavity(box, 4.0) & ~self.kidney_mask[box]
            _, inner = capsule_mask(self.grid, start, end, radius - 2.5, radius - 2.5, box)
            inner &= tube
            self.paint(box, tube, self.contrast.bowel_wall)
            content = self.rng.choice(["gas", "fluid", "mixed", "stool"], p=[0.35, 0.25, 0.25, 0.15])
            _, y, _ = self.grid.coords(box)
            if content == "gas":
                self.paint(box, inner, -950.0)
            elif content == "fluid":
                self.paint(box, inner, self.rng.uniform(0, 20))
            elif content == "stool":
                self.paint(box, inner, -60.0 + 80.0 * smooth_field(self.rng, inner.shape, 4))
            else:
                gas = inner & np.broadcast_to(y > 0.5 * (start[1] + end[1]), inner.shape)
                self.paint(box, inner & ~gas, self.rng.uniform(0, 20))
                self.paint(box, gas, -950.0)

    def liver_shape(self) -> tuple[tuple[slice, ...], np.ndarray]:
        """Smooth union of a right and a left lobe ellipsoid, perturbed by a smooth field, inside the cavity."""
        h = self.liver_height
        right_c = (0.40 * self.cavity_a + self.rng.uniform(-5, 5), self.cavity_centre_y - 0.1 * self.cavity_b, 0.0)
        right_r = (
            0.58 * self.cavity_a * self.rng.uniform(0.92, 1.08),
            0.85 * self.cavity_b * self.rng.uniform(0.9, 1.05),
            0.5 * h,
        )
        left_c = (-0.2 * self.cavity_a + self.rng.uniform(-8, 8), self.cavity_centre_y + 0.35 * self.cavity_b, 0.22 * h)
        left_r = (
            0.5 * self.cavity_a * self.rng.uniform(0.8, 1.15),
            0.45 * self.cavity_b,
            0.3 * h * self.rng.uniform(0.85, 1.1),
        )
        box = self.grid.box(
            (-self.cavity_a, -self.cavity_b + self.cavity_centre_y - 5, -0.6 * h),
            (self.cavity_a, self.cavity_b + self.cavity_centre_y + 5, 0.6 * h),
        )
        q_right, _ = ellipsoid_on_box(self.grid, box, right_c, right_r, rotation_z(self.rng.uniform(-0.15, 0.15)))
        q_left, _ = ellipsoid_on_box(self.grid, box, left_c, left_r, rotation_z(self.rng.uniform(-0.2, 0.1)))
        k = 6.0
        field = -np.log(np.exp(-k * (q_right**2 - 1)) + np.exp(-k * (q_left**2 - 1))) / k
        field += 0.12 * smooth_field(self.rng, field.shape, 5)
        x, _, z = self.grid.coords(box)
        floor = -0.5 * h + 0.25 * h * np.clip(0.6 - x / self.cavity_a, 0.0, 1.2)  # visceral surface rises medially
        return box, (field < 0) & self.cavity(box, 2.0) & (z > floor)

    def draw_liver(self) -> None:
        box, shape = self.liver_shape()
        self.liver[box] = shape
        self.liver &= ~self.kidney_mask & ~self.ivc_mask
        self._carve_gallbladder()
        self.liver = get_largest_connected_component_mask(self.liver, connectivity=1)
        self.hu[self.liver] = self.contrast.liver
        lbox = bounding_box(self.liver)
        texture = 4.0 * smooth_field(self.rng, tuple(s.stop - s.start for s in lbox), 10)
        region = self.hu[lbox]
        region[self.liver[lbox]] += texture[self.liver[lbox]]
        self.upper_organs |= self.liver
        self._draw_liver_vessels()
        self.paint(self.full_box(), self.ivc_mask, self.contrast.ivc)

    def _frame(self):
        """Liver extent in patient coordinates: (x_min, x_max, y_min, y_max, z_min, z_max)."""
        idx = np.argwhere(self.liver)
        lo, hi = idx.min(0), idx.max(0)
        xs, ys, zs = self.grid.axes
        return xs[lo[0]], xs[hi[0]], ys[lo[1]], ys[hi[1]], zs[lo[2]], zs[hi[2]]

    def _carve_gallbladder(self) -> None:
        if self.rng.random() > 0.8:
            return
        x0, x1, y0, y1, z0, z1 = self._frame()
        cx = x1 - 0.5 * (x1 - x0)
        centre = (cx, y0 + 0.75 * (y1 - y0), z0 + 0.2 * (z1 - z0))
        radii = (self.rng.uniform(12, 17), self.rng.uniform(15, 22), self.rng.uniform(25, 35))
        box, q, _ = ellipsoid_radius(self.grid, centre, radii, rotation_z(0.3) @ _rotation_x(-0.5))
        gallbladder = (q <= 1.0) & self.cavity(box, 3.0)
        self.liver[box] &= ~gallbladder
        self.paint(box, gallbladder, self.rng.uniform(0, 15))
        self.paint(box, gallbladder & (q > 1.0 - 2.0 / radii[0]), 45.0)

    def _draw_liver_vessels(self) -> None:
        """Hepatic veins along the Cantlie, right-sector and left planes; portal vein branches on the portal plane."""
        x0, x1, y0, y1, z0, z1 = self._frame()
        width, depth, height = x1 - x0, y1 - y0, z1 - z0
        cantlie = x1 - CANTLIE_FRACTION * width
        falciform = x1 - FALCIFORM_FRACTION * width
        portal = z0 + PORTAL_FRACTION * height
        sector = y0 + RIGHT_SECTOR_FRACTION * depth
        confluence = (self.ivc[0], self.ivc[1] + 5, z1 - 15)
        hepatic = [
            (confluence, (cantlie, y0 + 0.85 * depth, z0 + 0.3 * height)),
            (confluence, (x1 - 0.12 * width, sector, z0 + 0.25 * height)),
            (confluence, (falciform, y0 + 0.8 * depth, z0 + 0.65 * height)),
        ]
        bifurcation = (cantlie + 0.08 * width, y0 + 0.45 * depth, portal)
        portal_branches = [
            ((bifurcation[0] + 5, bifurcation[1] - 10, z0 - 5), bifurcation),
            (bifurcation, (x1 - 0.12 * width, y0 + 0.45 * depth, portal)),
            (bifurcation, (falciform - 0.05 * width, y0 + 0.75 * depth, portal + 0.05 * height)),
        ]
        for vessels, hu, radii in (
            (hepatic, self.contrast.hepatic_vein, (5.5, 2.0)),
            (portal_branches, self.contrast.portal_vein, (6.5, 2.5)),
        ):
            for start, end in vessels:
                box, tube = capsule_mask(self.grid, start, end, *radii)
                self.paint(box, tube & (self.liver[box] | self.cavity(box, 5.0) & ~self.upper_organs[box]), hu)

    def draw_thorax(self) -> None:
        """Heart and lung bases above the diaphragm (the top of the upper abdominal organs)."""
        x0, x1, y0, y1, z0, z1 = self._frame()
        heart_c = (-0.15 * self.cavity_a, self.cavity_centre_y + 0.3 * self.cavity_b, z1 + self.rng.uniform(40, 55))
        box, q, _ = ellipsoid_radius(self.grid, heart_c, (70.0, 50.0, 55.0), rotation_z(0.4))
        if q.size:
            heart = (q <= 1.0) & self.cavity(box, 6.0)
            self.paint(box, heart, 0.7 * self.contrast.aorta + 15.0)
            self.upper_organs[box] |= heart
        organs = self.upper_organs
        top = np.where(organs.any(-1), organs.shape[-1] - 1 - np.argmax(organs[..., ::-1], -1), -1)
        box = self.full_box()
        x, y, z = self.grid.coords(box)
        zs = self.grid.axes[2]
        organ_top = np.where(top >= 0, zs[np.clip(top, 0, None)] + 6.0, -np.inf)[..., None]
        posterior = np.clip((self.cavity_centre_y - y) / self.cavity_b, 0, 1)
        recess = z1 - 20.0 - 40.0 * posterior  # costophrenic recesses reach lower at the back
        lung = (z > np.maximum(organ_top, recess)) & self.cavity(box, 4.0) & ~organs
        lung &= self.hu > -500  # leave gas-filled structures alone
        lung &= np.broadcast_to(np.abs(x) > self.vertebra_r + 8, lung.shape)
        self.paint(box, lung, -850.0 + 30.0 * smooth_field(self.rng, lung.shape, 8))

    # ---------------------------------------------------------------- lesions
    def draw_lesions(self) -> None:
        options = self.options
        weights = np.asarray(options.lesion_count_weights, float)
        count = int(self.rng.choice(len(weights), p=weights / weights.sum()))
        liver_points = np.argwhere(self.liver)
        for _ in range(count):
            kind = str(self.rng.choice(LESION_KINDS, p=np.asarray(options.kind_weights) / sum(options.kind_weights)))
            low, high = options.diameter_range[kind]
            diameter = float(np.exp(self.rng.uniform(np.log(low), np.log(high))))
            for _attempt in range(30):
                if self._place_lesion(kind, diameter, liver_points):
                    break
                diameter = max(low, diameter * 0.9)

    def _lesion_centre(self, radius: float, liver_points: np.ndarray) -> np.ndarray:
        xs, ys, zs = self.grid.axes
        if self.kinds and self.rng.random() < self.options.touching_probability:
            other = np.argwhere(self.lesions == self.rng.choice(list(self.kinds)))
            anchor = np.array([xs[other[:, 0]].mean(), ys[other[:, 1]].mean(), zs[other[:, 2]].mean()])
            other_radius = 0.5 * (np.ptp(xs[other[:, 0]]) + np.ptp(ys[other[:, 1]])) / 2 + 0.5 * self.spacing[0]
            direction = self.rng.standard_normal(3)
            direction[2] *= 0.5
            return anchor + (other_radius + radius) * direction / np.linalg.norm(direction)
        i, j, k = liver_points[self.rng.integers(len(liver_points))]
        return np.array([xs[i], ys[j], zs[k]]) + self.rng.uniform(-0.5, 0.5, 3) * np.array(self.spacing)

    def _place_lesion(self, kind: str, diameter: float, liver_points: np.ndarray) -> bool:
        radius = diameter / 2
        centre = self._lesion_centre(radius, liver_points)
        radii = radius * self.rng.uniform(0.85, 1.15, 3)
        radii *= radius / np.cbrt(np.prod(radii))
        rotation = random_rotation(self.rng)
        box, q, local = ellipsoid_radius(self.grid, centre, radii, rotation, pad=1.2)
        if q.size == 0:
            return False
        if kind == "metastasis":
            azimuth = np.arctan2(local[1], local[0])
            q = q / (
                1.0
                + self.rng.uniform(0.05, 0.14)
                * np.sin(int(self.rng.integers(3, 6)) * azimuth + self.rng.uniform(0, 6.3))
            )
        shape = q <= 1.0
        free = self.liver[box] & (self.lesions[box] == 0)
        mask = shape & free
        if (
            mask.sum() < 3
            or mask.sum() < 0.6 * shape.sum()
            or (shape & (self.lesions[box] > 0)).sum() > 0.05 * shape.sum()
        ):
            return False
        lesion_id = len(self.kinds) + 1
        self.lesions[box][mask] = lesion_id
        self.kinds[lesion_id] = kind
        self.paint(box, mask, self._lesion_hu(kind, diameter, q))
        return True

    def _lesion_hu(self, kind: str, diameter: float, q: np.ndarray):
        liver = self.contrast.liver
        if kind == "cyst":
            return self.rng.uniform(0, 15)
        if kind == "hyperdense":
            return liver + self.rng.uniform(45, 90) + 6.0 * smooth_field(self.rng, q.shape, 3)
        core = min(self.rng.uniform(30, 50), liver - 45)
        hu = np.full(q.shape, core, np.float32) + 5.0 * smooth_field(self.rng, q.shape, 3)
        if diameter >= 25:
            hu[q < 0.45] -= self.rng.uniform(10, 20)
        if diameter >= 15:
            rim = max(1.2, 0.1 * diameter / 2) / (diameter / 2)
            boost = self.rng.uniform(5, 25) if self.phase != "delayed" else self.rng.uniform(0, 10)
            hu[q > 1.0 - rim] = liver + boost
        return hu

    # ---------------------------------------------------------------- image formation
    def finish(self) -> np.ndarray:
        """Partial-volume blur and correlated noise; returns int16 HU."""
        sigma_pve = (0.5, 0.5, 0.4)
        image = ndimage.gaussian_filter(self.hu, sigma_pve, mode="nearest")
        noise = self.rng.standard_normal(self.grid.shape, dtype=np.float32)
        noise = ndimage.gaussian_filter(noise, (0.7, 0.7, 0.0))
        noise *= self.rng.uniform(*self.options.noise_hu) / max(float(noise.std()), 1e-6)
        image += noise
        return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _rotation_x(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    idx = np.argwhere(mask)
    lo, hi = idx.min(0), idx.max(0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def render_phantom(rng: np.random.Generator, options: PhantomOptions | None = None) -> Phantom:
    """Draw one synthetic case with the random generator ``rng``; deterministic for a given generator state."""
    builder = PhantomBuilder(rng, options or PhantomOptions())
    builder.draw_body()
    builder.draw_spine()
    builder.draw_ribs()
    builder.draw_vessels_outside_liver()
    builder.draw_kidneys_and_psoas()
    builder.draw_spleen()
    builder.draw_stomach()
    builder.draw_bowel()
    builder.draw_liver()
    builder.draw_thorax()
    builder.draw_lesions()
    image = builder.finish()
    return Phantom(
        image=image,
        lesions=builder.lesions,
        liver=builder.liver.astype(np.uint8),
        affine=builder.affine(),
        kinds=dict(builder.kinds),
        phase=builder.phase,
    )
