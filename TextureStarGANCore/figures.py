"""Before/after figures with zoomed regions of interest (the paper's Fig. 4 style).

Top row: the full slices side by side (before, one or more harmonized versions, optionally the
difference), red boxes marking the regions of interest. One row below per ROI: the zoomed crops, each in
a display window suited to its tissue (lung or soft tissue), with the mean and standard deviation of HU
in the box, because kernel differences show up as noise texture and SD. Dark background as in a
reading room viewer. Shared by the command line, the evaluation and the Slicer module.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .masks import body_mask

__all__ = ["ROI", "choose_rois", "save_comparison_png", "LUNG_WINDOW", "SOFT_TISSUE_WINDOW", "BONE_WINDOW"]

# Display windows as (low, high) HU: lung W1500/L-600, soft tissue W400/L40, bone W2000/L300.
LUNG_WINDOW = (-1350.0, 150.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
BONE_WINDOW = (-700.0, 1300.0)
_BG = "#0b0b0b"
_FG = "#e8e8e8"
_ROI_COLOR = "#ff2a2a"
# Dark-centred diverging map (blue = darker after, red = brighter, black = unchanged) suits the dark page.
_DIFF_CMAP = "berlin"


@dataclass(frozen=True)
class ROI:
    """A square region: top-left (row, col) and side ``size`` in pixels; ``window`` (low, high) HU."""

    row: int
    col: int
    size: int
    label: str = ""
    window: tuple[float, float] | None = None

    def crop(self, image: np.ndarray) -> np.ndarray:
        return image[self.row:self.row + self.size, self.col:self.col + self.size]


def _window_name(window: tuple[float, float]) -> str:
    lo, hi = window
    return f"W{hi - lo:.0f} / L{(hi + lo) / 2:.0f}"


def choose_rois(image_hu: np.ndarray, pixel_spacing: tuple[float, float] | None = None,
                count: int = 2) -> list[ROI]:
    """Pick ``count`` non-overlapping square ROIs inside the body where kernel texture is easiest to see.

    First choice: lung parenchyma with the most structure (vessels, highest HU SD), shown in a lung
    window; second: soft tissue (mostly -150..150 HU) with the most fine texture (SD after removing
    the smooth background), shown in a soft-tissue window; further or fallback picks (e.g. a head CT
    without lungs): the regions with the most fine texture, bone window if they contain bone.
    The box side is about 40 mm when the pixel spacing is known.
    """
    from scipy import ndimage

    img = np.asarray(image_hu, dtype=np.float32)
    rows, cols = img.shape
    if pixel_spacing is not None:
        size = int(round(40.0 / float(min(pixel_spacing))))
    else:
        size = min(rows, cols) // 6
    size = int(np.clip(size, 12, max(12, min(rows, cols) // 3)))
    if size >= min(rows, cols):
        return [ROI(0, 0, min(rows, cols), "1", (-1000.0, 400.0))]
    body = body_mask(img).astype(np.float32)
    clipped = np.clip(img, -1100, 1500)
    fine = clipped - ndimage.gaussian_filter(clipped, 2.0)  # noise + fine structure, no large edges
    # Box statistics on a grid via box filters (mean of x and x^2 over each box).
    def box_mean(a: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(a, size=size, mode="constant")
    inside = box_mean(body)
    mean = box_mean(clipped)
    std = np.sqrt(np.maximum(box_mean(clipped**2) - mean**2, 0))
    fine_std = np.sqrt(np.maximum(box_mean(fine**2) - box_mean(fine) ** 2, 0))
    soft = (img > -150) & (img < 150)
    soft_frac = box_mean(soft.astype(np.float32))
    # Texture of soft tissue itself: fine signal only where a pixel and its neighbours are soft tissue,
    # so tissue/bone and tissue/air edges do not win.
    core = ndimage.binary_erosion(soft, iterations=3).astype(np.float32)
    soft_texture = np.sqrt(np.maximum(box_mean(fine**2 * core), 0) / np.maximum(box_mean(core), 1e-6))
    bone_frac = box_mean((img > 300).astype(np.float32))
    half = size // 2
    valid = np.zeros_like(body, dtype=bool)
    valid[half:rows - (size - half) + 1, half:cols - (size - half) + 1] = True
    valid &= inside >= 0.97
    stride = max(1, size // 4)
    grid = np.zeros_like(valid)
    grid[::stride, ::stride] = True
    valid &= grid

    picks: list[ROI] = []

    def take(score: np.ndarray, ok: np.ndarray, label: str, window: tuple[float, float] | None) -> bool:
        cand = valid & ok
        for roi in picks:  # no overlap with earlier picks (compare box centres)
            r0, c0 = roi.row + roi.size // 2, roi.col + roi.size // 2
            cand[max(0, r0 - size):r0 + size, max(0, c0 - size):c0 + size] = False
        if not cand.any():
            return False
        flat = np.where(cand, score, -np.inf)
        r, c = np.unravel_index(int(np.argmax(flat)), flat.shape)
        if window is None:
            window = BONE_WINDOW if bone_frac[r, c] > 0.05 else SOFT_TISSUE_WINDOW
        picks.append(ROI(int(r - half), int(c - half), size, label, window))
        return True

    lung_frac = box_mean(((img > -1000) & (img < -400)).astype(np.float32))
    lung = lung_frac > 0.95  # parenchyma with vessels, not chest wall
    if count >= 1:
        take(std, lung, "lung", LUNG_WINDOW)
    if len(picks) < count:
        take(soft_texture, (soft_frac > 0.97) & (bone_frac < 1e-3), "soft tissue", SOFT_TISSUE_WINDOW)
    while len(picks) < count and take(fine_std, np.ones_like(valid), "detail", None):
        pass
    return [ROI(r.row, r.col, r.size, f"{i + 1} {r.label}".strip(), r.window) for i, r in enumerate(picks)]


def _as_rois(rois: Sequence[ROI | Sequence[int]] | None, image: np.ndarray,
             spacing: tuple[float, float] | None) -> list[ROI]:
    if rois is None:
        return choose_rois(image, spacing)
    out = []
    for i, r in enumerate(rois):
        roi = r if isinstance(r, ROI) else ROI(int(r[0]), int(r[1]), int(r[2]))
        rows, cols = image.shape
        fits = roi.row >= 0 and roi.col >= 0 and roi.row + roi.size <= rows and roi.col + roi.size <= cols
        if roi.size < 2 or not fits:
            raise ValueError(f"ROI {i + 1} {roi} does not fit in the {rows} x {cols} image")
        label = roi.label or str(i + 1)
        out.append(ROI(roi.row, roi.col, roi.size, label, roi.window))
    return out


def _scale_bar(ax, length_px: float, label: str, image_shape: tuple[int, int]) -> None:
    rows, cols = image_shape
    y, x0 = rows * 0.95, cols * 0.05
    ax.text(x0 + length_px / 2, y - rows * 0.025, label, color="white", ha="center", va="bottom", fontsize=8)
    ax.plot([x0, x0 + length_px], [y, y], color="white", lw=2.5, solid_capstyle="butt")


def _as_images(
    before_hu: np.ndarray, after_hu: np.ndarray | Sequence[np.ndarray], titles: Sequence[str]
) -> tuple[list[np.ndarray], list[str]]:
    """[before, *afters] as float32 slices of one shape, with one title each."""
    before = np.asarray(before_hu, dtype=np.float32)
    afters = [np.asarray(after_hu, dtype=np.float32)] if np.ndim(after_hu) == 2 else \
        [np.asarray(a, dtype=np.float32) for a in after_hu]
    if before.ndim != 2:
        raise ValueError(f"before_hu must be one slice (rows, cols), got shape {before.shape}")
    for a in afters:
        if a.shape != before.shape:
            raise ValueError(f"after slice shape {a.shape} differs from before {before.shape}")
    images, titles = [before, *afters], list(titles)
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles; give one title per image")
    return images, titles


def _draw_difference(fig, ax, diff: np.ndarray, dlim: float, aspect: float, label: str) -> None:
    im = ax.imshow(diff, cmap=_DIFF_CMAP, vmin=-dlim, vmax=dlim, aspect=aspect, interpolation="nearest")
    cax = ax.inset_axes((0.2, 0.04, 0.6, 0.03))
    cb = fig.colorbar(im, cax=cax, orientation="horizontal")
    cb.set_label("change (HU)", color=_FG, fontsize=7, labelpad=3)
    cb.ax.tick_params(colors=_FG, labelsize=7)
    cb.outline.set_edgecolor(_FG)
    # Ticks and label above the bar: below it they would fall off the panel's bottom edge.
    cax.xaxis.set_ticks_position("top")
    cax.xaxis.set_label_position("top")
    ax.set_title(f"Difference ({label if len(label) < 32 else 'after - before'})", color=_FG, fontsize=10)


def _draw_zoom(zax, roi: ROI, img: np.ndarray, window: tuple[float, float], aspect: float,
               diff_limit: float | None, label_mm: float | None | bool) -> None:
    """One zoomed ROI panel; ``diff_limit`` set for the difference column; ``label_mm`` False: no ROI label,
    None: a label without size, else the ROI's side in mm."""
    box = {"facecolor": "black", "alpha": 0.55, "edgecolor": "none", "pad": 1.5}
    crop = roi.crop(img)
    if diff_limit is not None:
        zax.imshow(crop, cmap=_DIFF_CMAP, vmin=-diff_limit, vmax=diff_limit, aspect=aspect,
                   interpolation="nearest")
        text = f"mean {crop.mean():+.1f} HU, SD {crop.std():.1f} HU"
    else:
        zlo, zhi = roi.window or window
        zax.imshow(crop, cmap="gray", vmin=zlo, vmax=zhi, aspect=aspect, interpolation="nearest")
        text = f"mean {crop.mean():.0f} HU, SD {crop.std():.1f} HU"
        if label_mm is not False:
            side = f", {label_mm:.0f} mm" if label_mm is not None else ""
            zax.text(0.02, 0.98, f"ROI {roi.label}{side}  ({_window_name((zlo, zhi))})",
                     transform=zax.transAxes, color=_FG, fontsize=8, va="top", bbox=box)
    zax.text(0.02, 0.02, text, transform=zax.transAxes, color=_FG, fontsize=8, va="bottom", bbox=box)
    zax.set_xticks([])
    zax.set_yticks([])
    for spine in zax.spines.values():
        spine.set_edgecolor(_ROI_COLOR)
        spine.set_linewidth(1.6)


def save_comparison_png(
    path: str | os.PathLike,
    before_hu: np.ndarray,
    after_hu: np.ndarray | Sequence[np.ndarray],
    *,
    titles: Sequence[str] = ("Before", "After"),
    rois: Sequence[ROI | Sequence[int]] | None = None,
    window: tuple[float, float] = (-1000.0, 400.0),
    pixel_spacing: tuple[float, float] | None = None,
    difference: bool = False,
    suptitle: str | None = None,
    dpi: int = 110,
) -> Path:
    """Write a before/after PNG (atomically) and return its path.

    ``before_hu`` is one slice (rows, cols) in HU; ``after_hu`` one slice or a list of slices (e.g.
    two models), each with a title in ``titles`` (before first). ``rois``: ROI objects or (row, col,
    size) tuples, top-left corner in pixels; None picks them automatically (``choose_rois``).
    ``window`` is the display window of the full slices; ``pixel_spacing`` (x, y) mm gives the
    correct aspect ratio and scale bars; ``difference`` adds a last-minus-before column.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .fileio import write_figure_png

    images, titles = _as_images(before_hu, after_hu, titles)
    before = images[0]
    roi_list = _as_rois(rois, before, pixel_spacing)
    sx, sy = (float(pixel_spacing[0]), float(pixel_spacing[1])) if pixel_spacing is not None else (1.0, 1.0)
    aspect = sy / sx
    diff = images[-1] - before if difference else None
    dlim = 10.0
    if diff is not None:
        body = body_mask(before)
        vals = np.abs(diff[body]) if body.any() else np.abs(diff).ravel()
        dlim = max(10.0, float(np.percentile(vals, 99)))

    ncols = len(images) + (1 if diff is not None else 0)
    nrows = 1 + len(roi_list)
    panel = 3.6
    heights = [1.0] + [0.62] * len(roi_list)
    fig = plt.figure(figsize=(panel * ncols, panel * sum(heights) + 0.7), facecolor=_BG)
    gs = fig.add_gridspec(nrows, ncols, height_ratios=heights, hspace=0.12, wspace=0.04,
                          left=0.01, right=0.99, top=0.90 if suptitle else 0.94, bottom=0.02)
    lo, hi = window
    for j in range(ncols):
        is_diff = diff is not None and j == ncols - 1
        img = diff if is_diff else images[j]
        ax = fig.add_subplot(gs[0, j])
        if is_diff:
            _draw_difference(fig, ax, img, dlim, aspect, f"{titles[-1]} - {titles[0]}")
        else:
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
            ax.set_title(titles[j], color=_FG, fontsize=11, fontweight="bold")
            ax.text(0.99, 0.01, _window_name(window), transform=ax.transAxes, color=_FG, fontsize=7,
                    ha="right", va="bottom")
        for roi in roi_list:
            ax.add_patch(Rectangle((roi.col - 0.5, roi.row - 0.5), roi.size, roi.size, fill=False,
                                   edgecolor=_ROI_COLOR, lw=1.4))
            ax.text(roi.col + roi.size + 2, roi.row, roi.label.split(" ")[0], color=_ROI_COLOR, fontsize=9,
                    fontweight="bold", va="top")
        if pixel_spacing is not None and not is_diff:
            bar_mm = 50.0 if before.shape[1] * sx > 150 else 10.0
            _scale_bar(ax, bar_mm / sx, f"{bar_mm:.0f} mm", before.shape)
        ax.set_axis_off()
        for i, roi in enumerate(roi_list, start=1):
            side_mm = roi.size * sx if pixel_spacing is not None else None
            _draw_zoom(fig.add_subplot(gs[i, j]), roi, img, window, aspect, dlim if is_diff else None,
                       label_mm=side_mm if j == 0 else False)
    if suptitle:
        fig.suptitle(suptitle, color=_FG, fontsize=12)
    out = Path(path)
    write_figure_png(fig, out, dpi=dpi, facecolor=_BG)
    return out
