"""A random chest phantom in Hounsfield units for the kernel simulator.

Each simulated patient draws its own anatomy from a seed: body outline with subcutaneous fat, chest wall
muscle, two lungs with parenchyma texture, bronchovascular trees, nodules, heart and aorta, ribs, sternum,
spine with discs, and optionally the patient table. Everything is defined in millimetres in patient (LPS)
coordinates (x to the patient's left = image columns, y posterior = image rows, z superior), so the same
patient can be rasterised on grids of different fields of view, and anatomy changes smoothly along z:
the outline and organ sizes vary slowly with z, vessels and airways are 3D tubes, nodules are spheres,
ribs are oblique bands, and the texture is a 3D random field.

Edges are anti-aliased (partial volume over one pixel) so the projection step sees no staircase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# Tissue values in HU (non-contrast chest CT).
AIR, LUNG, FAT, MUSCLE, BLOOD, SOFT = -1000.0, -860.0, -100.0, 45.0, 40.0, 30.0
CORTICAL, TRABECULAR, DISC, AIRWAY_WALL = 900.0, 230.0, 85.0, 20.0

__all__ = ["PhantomParams", "Tube", "ChestPhantom", "pixel_grid"]


@dataclass(frozen=True)
class Tube:
    """A capsule (3D segment with radius) in mm: a vessel or airway piece."""

    p0: tuple[float, float, float]
    p1: tuple[float, float, float]
    radius: float
    wall: float = 0.0  # airway wall thickness (0 for vessels)


@dataclass
class PhantomParams:
    """The anatomy of one simulated patient (all lengths in mm)."""

    center: tuple[float, float]
    body_axes: tuple[float, float]  # lateral, antero-posterior semi-axes
    outline_harmonics: list[tuple[int, float, float]]  # (order, amplitude, phase) of the body outline
    z_phase: float
    z_period: float
    fat_mm: float
    wall_mm: float
    lung_scale: float
    heart_axes: tuple[float, float]
    vessels: list[Tube] = field(default_factory=list)
    airways: list[Tube] = field(default_factory=list)
    nodules: list[tuple[float, float, float, float, float]] = field(default_factory=list)  # x, y, z, r, HU
    rib_z0: list[float] = field(default_factory=list)
    disc_z0: float = 0.0
    table: bool = True
    table_gap_mm: float = 10.0
    texture_seed: int = 0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-9)


def _grow_tree(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    length: float,
    generations: int,
    wall_frac: float,
    out: list[Tube],
) -> None:
    """Recursive binary branching with shrinking radius and length (a crude bronchovascular tree)."""
    stack = [(start, _unit(direction), radius, length, 0)]
    while stack:
        p0, d, r, L, g = stack.pop()
        p1 = p0 + d * L
        wall = wall_frac * r + 0.4 if wall_frac > 0 else 0.0
        out.append(Tube(tuple(p0), tuple(p1), r, wall))
        if g + 1 >= generations:
            continue
        for _ in range(2):
            nd = _unit(d + rng.normal(0.0, 0.55, 3))
            stack.append((p1, nd, r * rng.uniform(0.68, 0.8), L * rng.uniform(0.7, 0.9), g + 1))


def random_params(rng: np.random.Generator, z_range: tuple[float, float]) -> PhantomParams:
    """Draw one patient's anatomy; ``z_range`` (mm) is the slab the slices will cover."""
    z_lo, z_hi = z_range
    z_mid = 0.5 * (z_lo + z_hi)
    a = rng.uniform(118.0, 140.0)
    b = rng.uniform(85.0, 108.0)
    center = (rng.uniform(-6.0, 6.0), rng.uniform(-12.0, 4.0))
    harmonics = [(k, rng.uniform(0.0, 0.025), rng.uniform(0, 2 * math.pi)) for k in (2, 3, 4, 5)]
    p = PhantomParams(
        center=center,
        body_axes=(a, b),
        outline_harmonics=harmonics,
        z_phase=rng.uniform(0, 2 * math.pi),
        z_period=rng.uniform(220.0, 360.0),
        fat_mm=rng.uniform(6.0, 24.0),
        wall_mm=rng.uniform(9.0, 15.0),
        lung_scale=rng.uniform(0.92, 1.02),
        heart_axes=(rng.uniform(0.22, 0.28), rng.uniform(0.30, 0.38)),
        table=bool(rng.uniform() < 0.85),
        table_gap_mm=rng.uniform(2.0, 18.0),
        texture_seed=int(rng.integers(0, 2**31 - 1)),
        disc_z0=rng.uniform(0.0, 28.0),
    )
    cx, cy = center
    # Vascular trees from each hilum (upper, middle, lower lobes), and the airway tree from the carina.
    for side in (-1.0, 1.0):
        for dz in (-35.0, 0.0, 35.0):
            start = np.array([cx + side * 0.16 * a, cy - 0.05 * b, z_mid + dz + rng.uniform(-10, 10)])
            direction = np.array([side * 1.0, rng.uniform(-0.6, 0.6), dz / 40.0 + rng.uniform(-0.5, 0.5)])
            _grow_tree(rng, start, direction, rng.uniform(4.5, 6.5), rng.uniform(28, 38), 6, 0.0, p.vessels)
    # Small peripheral vessels: short random tubes scattered through both lungs (the dotted/linear
    # pattern of lung parenchyma that kernels render so differently).
    for _ in range(int(rng.integers(450, 650))):
        side = rng.choice([-1.0, 1.0])
        c = np.array(
            [
                cx + side * 0.47 * a + rng.uniform(-0.38, 0.38) * a,
                cy + rng.uniform(-0.75, 0.7) * b,
                rng.uniform(z_lo - 25.0, z_hi + 25.0),
            ]
        )
        half = _unit(rng.normal(0.0, 1.0, 3)) * rng.uniform(4.0, 14.0)
        p.vessels.append(Tube(tuple(c - half), tuple(c + half), rng.uniform(0.5, 1.7)))
    carina_z = z_mid + rng.uniform(-5.0, 25.0)
    trachea_xy = (cx + rng.uniform(-4, 4), cy - 0.18 * b)
    p.airways.append(Tube((*trachea_xy, carina_z), (*trachea_xy, carina_z + 400.0), 8.5, 2.2))
    for side in (-1.0, 1.0):
        end = np.array([trachea_xy[0] + side * 32.0, trachea_xy[1] + 6.0, carina_z - 25.0])
        p.airways.append(Tube((*trachea_xy, carina_z), tuple(end), 6.0, 1.8))
        for dz in (-1.0, 1.0):
            direction = np.array([side, rng.uniform(-0.4, 0.4), dz * rng.uniform(0.4, 1.0)])
            _grow_tree(rng, end, direction, rng.uniform(3.5, 4.5), rng.uniform(25, 32), 4, 0.2, p.airways)
    # Nodules inside the lungs (placed relative to each lung's centre so they rarely leave it).
    for _ in range(int(rng.integers(0, 4))):
        side = rng.choice([-1.0, 1.0])
        x = cx + side * a * rng.uniform(0.35, 0.62)
        y = cy + b * rng.uniform(-0.45, 0.35)
        z = rng.uniform(z_lo - 10.0, z_hi + 10.0)
        hu = float(rng.choice([rng.uniform(-650, -450), rng.uniform(0, 60)]))
        p.nodules.append((x, y, z, rng.uniform(3.0, 11.0), hu))
    # Ribs every ~25 mm along z, slightly jittered; they descend anteriorly (see _ribs).
    first = z_lo - 80.0 + rng.uniform(0, 25)
    p.rib_z0 = [first + 25.0 * k + rng.uniform(-3, 3) for k in range(int((z_hi - z_lo + 200) / 25) + 1)]
    return p


def pixel_grid(size: int, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) mm coordinates of pixel centres of a size x size grid centred on the isocentre."""
    c = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * np.float32(pixel_mm)
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


def _soft(signed_mm: np.ndarray, pixel_mm: float) -> np.ndarray:
    """Inside fraction from a signed distance (negative inside): a one-pixel partial-volume ramp."""
    return np.clip(0.5 - signed_mm / pixel_mm, 0.0, 1.0).astype(np.float32)


def _ellipse_sd(x, y, cx, cy, ax, ay) -> np.ndarray:
    # Approximate signed distance: normalised radius minus one, scaled by the local semi-axis.
    r = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)
    return (r - 1.0) * np.sqrt(ax * ay)


def _paint(img: np.ndarray, mask: np.ndarray, value) -> None:
    img *= 1.0 - mask
    img += mask * value


def _paint_ellipse(img, x, y, cx, cy, ax, ay, value, px) -> None:
    """Paint a soft ellipse, touching only its bounding box (small organs and bones)."""
    x0, y0, n = float(x[0, 0]), float(y[0, 0]), x.shape[0]
    j0, j1 = max(int((cx - ax - x0) / px) - 2, 0), min(int((cx + ax - x0) / px) + 3, n)
    i0, i1 = max(int((cy - ay - y0) / px) - 2, 0), min(int((cy + ay - y0) / px) + 3, n)
    if j0 >= j1 or i0 >= i1:
        return
    sub = img[i0:i1, j0:j1]
    _paint(sub, _soft(_ellipse_sd(x[i0:i1, j0:j1], y[i0:i1, j0:j1], cx, cy, ax, ay), px), value)


class ChestPhantom:
    """Rasterises one patient's anatomy on any grid; ``slices`` gives (N, size, size) HU."""

    def __init__(self, params: PhantomParams, slice_z_mm: np.ndarray) -> None:
        self.p = params
        self.z = np.asarray(slice_z_mm, dtype=np.float64)

    def _texture(self, size: int, pixel_mm: float) -> tuple[np.ndarray, np.ndarray]:
        """Two 3D random fields (lung parenchyma: fine; soft tissue: coarse), unit SD, seeded per patient.

        Correlation lengths are in mm, so the texture has the same physical scale on any grid; the
        simulator rasterises a patient once on a common grid and resamples it per scanner."""
        rng = np.random.default_rng(self.p.texture_seed)
        dz = float(np.median(np.diff(self.z))) if len(self.z) > 1 else 2.5
        fields = []
        for sigma_mm, sub in ((1.0, 1), (4.0, 4)):
            # The coarse field is drawn on a 4x coarser grid and upsampled: same statistics, 16x cheaper.
            n = -(-size // sub)
            vol = rng.standard_normal((len(self.z), n, n), dtype=np.float32)
            sz = max(sigma_mm / dz, 0.6) if len(self.z) > 1 else 0.0
            sxy = sigma_mm / (pixel_mm * sub)
            vol = ndimage.gaussian_filter(vol, (sz, sxy, sxy), mode="wrap", truncate=3.0)
            if sub > 1:
                from Training.simulator.kernels import resample_centered

                vol = np.stack([resample_centered(v, pixel_mm * sub, size, pixel_mm) for v in vol])
            vol /= max(float(vol.std()), 1e-6)
            fields.append(vol)
        return fields[0], fields[1]

    def slices(self, size: int, pixel_mm: float, progress=None) -> np.ndarray:
        """All slices on a size x size grid with ``pixel_mm`` pixels: float32 (N, size, size) HU."""
        x, y = pixel_grid(size, pixel_mm)
        fine, coarse = self._texture(size, pixel_mm)
        out = np.empty((len(self.z), size, size), dtype=np.float32)
        for k, z in enumerate(self.z):
            out[k] = self._slice(x, y, float(z), pixel_mm, fine[k], coarse[k])
            if progress is not None:
                progress(k + 1, len(self.z))
        return out

    def _slice(self, x, y, z, px, fine, coarse) -> np.ndarray:
        p = self.p
        cx, cy = p.center
        s = 1.0 + 0.035 * math.sin(2 * math.pi * z / p.z_period + p.z_phase)
        a, b = p.body_axes[0] * s, p.body_axes[1] * s
        theta = np.arctan2((y - cy) / b, (x - cx) / a)
        wobble = 1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in p.outline_harmonics)
        r = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) / wobble
        scale = math.sqrt(a * b)
        img = np.full(x.shape, AIR, dtype=np.float32)
        # Body = fat; muscle inside it; thoracic cavity (mediastinal fat) inside the wall.
        body = _soft((r - 1.0) * scale, px)
        _paint(img, body, FAT + 8.0 * coarse)
        fat_in = 1.0 - p.fat_mm / scale
        muscle_r = fat_in + 0.25 * p.fat_mm / scale * np.cos(theta) ** 2  # fat thicker at the sides
        muscle = _soft((r - muscle_r) * scale, px)
        _paint(img, muscle, MUSCLE + 6.0 * coarse)
        cavity_r = muscle_r - p.wall_mm / scale
        cavity = _soft((r - cavity_r) * scale, px)
        _paint(img, cavity, -70.0 + 10.0 * coarse)
        self._ribs(img, x, y, z, px, theta, r, muscle_r, cavity_r, scale)
        self._lungs(img, x, y, z, px, a, b, cavity, fine)
        self._mediastinum(img, x, y, z, px, a, b)
        self._spine(img, x, y, z, px, a, b, cavity_r)
        if p.table:
            self._table(img, x, y, px, b * (1.0 + 0.06))
        return img

    def _lungs(self, img, x, y, z, px, a, b, cavity, fine) -> None:
        p = self.p
        cx, cy = p.center
        grow = p.lung_scale * (1.0 + 0.05 * math.sin(2 * math.pi * z / (0.8 * p.z_period) + 1.3 * p.z_phase))
        lung = np.zeros_like(img)
        for side in (-1.0, 1.0):
            lx = cx + side * 0.47 * a
            ax = (0.40 if side > 0 else 0.43) * a * grow
            ay = 0.80 * b * grow
            # Superellipse-ish lung: flattened medial side by the squared normalised radius.
            rr = np.sqrt(((x - lx) / ax) ** 2 + ((y - cy + 0.02 * b) / ay) ** 2)
            lung = np.maximum(lung, _soft((rr**1.3 - 1.0) * math.sqrt(ax * ay), px))
        lung *= cavity
        # Heart cuts into the left lung anteriorly.
        hx, hy = cx + 0.12 * a, cy - 0.25 * b
        heart = _soft(_ellipse_sd(x, y, hx, hy, p.heart_axes[0] * a, p.heart_axes[1] * b), px)
        lung *= 1.0 - heart
        parenchyma = LUNG + 22.0 * fine
        # Vessels (blood) and airways (wall + air) inside the lungs only: elsewhere they are hidden anyway.
        vess = self._tubes(p.vessels, x, y, z, px, use_wall=False)
        parenchyma = parenchyma * (1.0 - vess) + BLOOD * vess
        wall, lumen = self._tubes(p.airways, x, y, z, px, use_wall=True)
        parenchyma = parenchyma * (1.0 - wall) + AIRWAY_WALL * wall
        parenchyma = parenchyma * (1.0 - lumen) + AIR * lumen
        for nx, ny, nz, nr, hu in p.nodules:
            dzn = z - nz
            if abs(dzn) >= nr:
                continue
            rz = math.sqrt(nr * nr - dzn * dzn)
            m = _soft(np.sqrt((x - nx) ** 2 + (y - ny) ** 2) - rz, px)
            parenchyma = parenchyma * (1.0 - m) + (hu + 15.0 * fine) * m
        _paint(img, lung, parenchyma)

    def _tubes(self, tubes: list[Tube], x, y, z, px, use_wall: bool):
        """Soft masks of capsules cut by plane z: vessels -> mask; airways -> (wall, lumen) masks."""
        outer = np.zeros_like(x)
        inner = np.zeros_like(x) if use_wall else None
        x0, y0 = float(x[0, 0]), float(y[0, 0])
        n = x.shape[0]
        for t in tubes:
            R = t.radius + t.wall
            z_lo, z_hi = min(t.p0[2], t.p1[2]) - R, max(t.p0[2], t.p1[2]) + R
            if not z_lo <= z <= z_hi:
                continue
            p0 = np.array(t.p0)
            d = np.array(t.p1) - p0
            dd = float(d @ d)
            # Only the part of the segment within R of the plane matters: bound its xy footprint.
            if abs(d[2]) > 1e-6:
                ta = np.clip([(z - R - p0[2]) / d[2], (z + R - p0[2]) / d[2]], 0.0, 1.0)
            else:
                ta = np.array([0.0, 1.0])
            xs = p0[0] + d[0] * ta
            ys = p0[1] + d[1] * ta
            j0 = max(int((xs.min() - R - x0) / px) - 1, 0)
            j1 = min(int((xs.max() + R - x0) / px) + 2, n)
            i0 = max(int((ys.min() - R - y0) / px) - 1, 0)
            i1 = min(int((ys.max() + R - y0) / px) + 2, n)
            if j0 >= j1 or i0 >= i1:
                continue
            bx, by = x[i0:i1, j0:j1], y[i0:i1, j0:j1]
            wx, wy, wz = bx - p0[0], by - p0[1], z - p0[2]
            tt = np.clip((wx * d[0] + wy * d[1] + wz * d[2]) / max(dd, 1e-9), 0.0, 1.0)
            dist = np.sqrt((wx - tt * d[0]) ** 2 + (wy - tt * d[1]) ** 2 + (wz - tt * d[2]) ** 2)
            np.maximum(outer[i0:i1, j0:j1], _soft(dist - R, px), out=outer[i0:i1, j0:j1])
            if use_wall:
                np.maximum(inner[i0:i1, j0:j1], _soft(dist - t.radius, px), out=inner[i0:i1, j0:j1])
        return (outer, inner) if use_wall else outer

    def _mediastinum(self, img, x, y, z, px, a, b) -> None:
        p = self.p
        cx, cy = p.center
        hx, hy = cx + 0.12 * a, cy - 0.25 * b
        _paint_ellipse(img, x, y, hx, hy, p.heart_axes[0] * a, p.heart_axes[1] * b, BLOOD, px)
        # Descending aorta left-anterior of the spine; ascending aorta in front of the trachea.
        _paint_ellipse(img, x, y, cx + 0.17 * a, cy + 0.35 * b, 12.0, 12.0, BLOOD, px)
        _paint_ellipse(img, x, y, cx + 0.04 * a, cy - 0.42 * b, 14.0, 14.0, BLOOD, px)
        # Trachea / main bronchi where they run through the mediastinum.
        wall, lumen = self._tubes(p.airways[:3], x, y, z, px, use_wall=True)
        _paint(img, wall, AIRWAY_WALL)
        _paint(img, lumen, AIR)
        # Sternum.
        sy = cy - b * 0.93 + p.fat_mm * 0.3
        _paint_ellipse(img, x, y, cx, sy, 14.0, 6.0, CORTICAL, px)
        _paint_ellipse(img, x, y, cx, sy, 12.0, 4.0, TRABECULAR, px)

    def _spine(self, img, x, y, z, px, a, b, cavity_r) -> None:
        p = self.p
        cx, cy = p.center
        vy = cy + 0.62 * b
        in_disc = ((z - p.disc_z0) % 28.0) < 5.0
        if in_disc:
            _paint_ellipse(img, x, y, cx, vy, 21.0, 16.0, DISC, px)
        else:
            _paint_ellipse(img, x, y, cx, vy, 21.0, 16.0, CORTICAL * 0.8, px)
            _paint_ellipse(img, x, y, cx, vy, 19.0, 14.0, TRABECULAR, px)
        # Posterior arch (pedicles + lamina) and spinous process, then the canal.
        _paint_ellipse(img, x, y, cx, vy + 24.0, 17.0, 11.0, CORTICAL * 0.7, px)
        _paint_ellipse(img, x, y, cx, vy + 40.0, 4.5, 12.0, CORTICAL * 0.7, px)
        _paint_ellipse(img, x, y, cx, vy + 24.0, 8.5, 8.5, 10.0, px)

    def _ribs(self, img, x, y, z, px, theta, r, muscle_r, cavity_r, scale) -> None:
        """Ribs as oblique bands in the chest wall: rib k crosses plane z where z_k(psi) = z."""
        p = self.p
        # psi: angle from the posterior midline (0 at the spine, pi at the sternum).
        psi = np.abs(np.arctan2(x - p.center[0], y - p.center[1]))
        radial_all = (r - 0.5 * (muscle_r + cavity_r)) * scale  # mm from the middle of the wall
        idx = np.nonzero((np.abs(radial_all) < 9.0) & (psi > 0.35) & (psi < 2.45))
        if idx[0].size == 0:
            return
        radial, psi_w = radial_all[idx], psi[idx]
        band = np.zeros(radial.shape, dtype=np.float32)
        core = np.zeros(radial.shape, dtype=np.float32)
        for z0 in p.rib_z0:
            dz = np.abs(z - (z0 - 55.0 * (psi_w / math.pi)))  # anterior end ~55 mm lower than posterior
            if dz.min() >= 6.0:
                continue
            # Elliptic cross-section: 5 mm half-height along z, 4.5 mm half-width radially.
            e = np.sqrt((dz / 5.0) ** 2 + (radial / 4.5) ** 2)
            np.maximum(band, _soft((e - 1.0) * 4.5, px), out=band)
            np.maximum(core, _soft((e - 0.65) * 4.5, px), out=core)
        full = np.zeros_like(img)
        full[idx] = band
        _paint(img, full, CORTICAL)
        full[idx] = core
        _paint(img, full, TRABECULAR + 60.0)

    def _table(self, img, x, y, px, b) -> None:
        """Curved carbon-fibre table shell with foam core, below the patient."""
        p = self.p
        top = p.center[1] + b + p.table_gap_mm
        curve = top + 0.0009 * (x - p.center[0]) ** 2
        shell = _soft(np.abs(y - curve - 1.5) - 1.5, px) * (np.abs(x - p.center[0]) < 190.0)
        foam = _soft(np.abs(y - curve - 14.0) - 10.0, px) * (np.abs(x - p.center[0]) < 175.0)
        _paint(img, foam, -880.0)
        _paint(img, shell, 250.0)
        _paint(img, _soft(np.abs(y - curve - 25.5) - 1.5, px) * (np.abs(x - p.center[0]) < 175.0), 250.0)
