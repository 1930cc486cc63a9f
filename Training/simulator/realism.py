"""Realism check: each shared real series against its emulation on the same anatomy at matched noise.

For every real series (``REAL_SERIES``) the object is made from the series itself, or for a paired
acquisition from its smooth member (``anatomy.attenuation_map``), and re-reconstructed with the matching
catalogue kernel(s) on the real series' own grid. The noise is matched on the smooth (or only) member:
one noise amplitude, i.e. one dose, for the whole acquisition, so a pair's sharp member is a prediction.
Both sides are measured by the same code in the same pixels (``measure.measure_slices``): soft-tissue
high-pass noise SD, radial NPS (peak frequency and shape), skin-air edge width, and for the pairs the
sharp / smooth noise ratio and NPS ratio curve.

Slices: the pairs' kernels were fitted on the first half of their slices (``fit_pairs``), so the check
uses the second half; the other series were not used for fitting at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from TextureStarGANCore.fileio import write_csv_atomic, write_figure_png, write_json_atomic, write_text_atomic
from Training.simulator import anatomy as A
from Training.simulator.catalogue import catalogue_kernel
from Training.simulator.measure import NoiseFigures, highpass_noise_sd, measure_slices, soft_tissue_mask
from Training.simulator.nps import plot_nps

__all__ = [
    "RealSeries",
    "REAL_SERIES",
    "realism",
    "fit_pairs",
    "compare_group",
    "example_figure",
    "TABLE_COLUMNS",
]


@dataclass(frozen=True)
class RealSeries:
    """A real series, the catalogue kernel emulating it, and the acquisition group it belongs to."""

    folder: str  # relative to the real_ct folder
    domain: str
    group: str
    smooth: bool  # the member that gives the object and on which the noise is matched
    iterative: bool = False


REAL_SERIES: tuple[RealSeries, ...] = (
    RealSeries("philips_brilliance16_chest_l_b_pair/B_smooth", "PHILIPS_B", "chest_pair", True),
    RealSeries("philips_brilliance16_chest_l_b_pair/L_sharp", "PHILIPS_L", "chest_pair", False),
    RealSeries(
        "philips_ingenuity_head_phantom_ub_ya_pair/UB_standard", "PHILIPS_UB_IDOSE", "head_pair", True, True
    ),
    RealSeries("philips_ingenuity_head_phantom_ub_ya_pair/YA_bone", "PHILIPS_YA", "head_pair", False),
    RealSeries(
        "philips_bigbore_chest_abdomen_b_idose/dicom", "PHILIPS_BIGBORE_B_IDOSE3", "bigbore", True, True
    ),
    RealSeries("ge_discovery_st_soft_standard_cropped/STS_008", "GE_DST_SOFT", "ge_dst_soft", True),
    RealSeries("ge_discovery_st_soft_standard_cropped/STS_002", "GE_DST_STANDARD", "ge_dst_standard", True),
    RealSeries("ge_hispeed_dual_head_std_plus", "GE_HISPEED_STDPLUS", "ge_hispeed", True),
)
PAIRS = {"chest_pair", "head_pair"}

TABLE_COLUMNS = (
    "series",
    "domain",
    "slices",
    "role",
    "real_hp_sd_hu",
    "sim_hp_sd_hu",
    "real_nps_peak",
    "sim_nps_peak",
    "nps_peak_error_pct",
    "nps_shape_r",
    "real_edge_mm",
    "sim_edge_mm",
    "pair_ratio_real",
    "pair_ratio_sim",
    "pair_ratio_error_pct",
)


def _square(hu: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Pad (reflect) a non-square crop to a square, as the reconstruction grid is square."""
    n, r, c = hu.shape
    s = max(r, c)
    if r == c:
        return hu, (r, c)
    return np.pad(hu, ((0, 0), (0, s - r), (0, s - c)), mode="reflect"), (r, c)


def _slices(n: int, half: str, count: int) -> np.ndarray:
    idx = np.arange(n)
    idx = idx[n // 2 :] if half == "second" else idx[: n // 2] if half == "first" else idx
    return idx[np.linspace(0, len(idx) - 1, min(count, len(idx))).round().astype(int)]


def simulate_group(
    members: Sequence[RealSeries], root: Path, half: str, count: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, float, float]]:
    """{folder: (real slices, simulated slices, pixel, noise scale)}; noise matched on the smooth member."""
    from TextureStarGANCore.volume_io import read_volume

    loaded = {m.folder: read_volume(root / m.folder) for m in members}
    smooth = next(m for m in members if m.smooth)
    ref = loaded[smooth.folder]
    idx = _slices(ref.hu.shape[0], half, count)
    px = float(ref.spacing[0])
    src = catalogue_kernel(smooth.domain)
    specs = [catalogue_kernel(m.domain) for m in members]
    cals = A.CalibrationCache()
    signal = {m.domain: [] for m in members}
    noise = {m.domain: [] for m in members}
    for k in idx:
        sq, shape = _square(ref.hu[k : k + 1])
        obj = A.attenuation_map(sq[0], px, src, cals.get(src, px))
        # Same rng twice: signal alone, then signal + noise; their difference is the noise alone.
        clean = A.reconstruct_kernels(
            obj,
            px,
            specs,
            cals,
            A.REFERENCE_PHOTONS,
            np.random.default_rng([seed, k]),
            noise_scale=0.0,
            scan_circle=False,
        )
        noisy = A.reconstruct_kernels(
            obj, px, specs, cals, A.REFERENCE_PHOTONS, np.random.default_rng([seed, k]), scan_circle=False
        )
        for m in members:
            signal[m.domain].append(clean[m.domain][: shape[0], : shape[1]])
            noise[m.domain].append(noisy[m.domain][: shape[0], : shape[1]] - signal[m.domain][-1])
    real_s = ref.hu[idx]
    sig, noi = np.stack(signal[smooth.domain]), np.stack(noise[smooth.domain])
    masks = [soft_tissue_mask(r) for r in real_s]

    def hp(imgs: np.ndarray) -> float:
        return math.sqrt(np.nanmean([highpass_noise_sd(i, m) ** 2 for i, m in zip(imgs, masks, strict=True)]))

    target, s_sig, s_noise = hp(real_s), hp(sig), hp(noi)
    scale = math.sqrt(max(target**2 - s_sig**2, 0.0)) / max(s_noise, 1e-6)
    out = {}
    for m in members:
        sim = np.stack(signal[m.domain]) + scale * np.stack(noise[m.domain])
        out[m.folder] = (loaded[m.folder].hu[idx], sim.astype(np.float32), px, scale)
    return out


def _shape_r(a: NoiseFigures, b: NoiseFigures) -> float:
    return float(np.corrcoef(a.nps, b.nps)[0, 1])


def compare_group(members: Sequence[RealSeries], data: dict, out_dir: Path | None = None) -> list[dict]:
    """Table rows for one acquisition (and its NPS overlay PNG when ``out_dir`` is given)."""
    smooth = next(m for m in members if m.smooth)
    ref_real = data[smooth.folder][0]
    figs = {}
    for m in members:
        real, sim, px, _ = data[m.folder]
        figs[m.folder] = (measure_slices(real, px, ref_real), measure_slices(sim, px, ref_real))
    rows = []
    for m in members:
        r, s = figs[m.folder]
        row = {
            "series": m.folder,
            "domain": m.domain,
            "slices": len(data[m.folder][0]),
            "role": ("noise matched" if m.smooth else "predicted (same dose)")
            + (", iterative" if m.iterative else ""),
            "real_hp_sd_hu": round(r.highpass_sd_hu, 2),
            "sim_hp_sd_hu": round(s.highpass_sd_hu, 2),
            "real_nps_peak": round(r.nps_peak_per_mm, 3),
            "sim_nps_peak": round(s.nps_peak_per_mm, 3),
            "nps_peak_error_pct": round(100 * (s.nps_peak_per_mm / r.nps_peak_per_mm - 1), 1),
            "nps_shape_r": round(_shape_r(r, s), 3),
            "real_edge_mm": round(r.edge_width_mm, 2) if math.isfinite(r.edge_width_mm) else "",
            "sim_edge_mm": round(s.edge_width_mm, 2) if math.isfinite(s.edge_width_mm) else "",
            "pair_ratio_real": "",
            "pair_ratio_sim": "",
            "pair_ratio_error_pct": "",
        }
        if not m.smooth:
            rs, ss = figs[smooth.folder]
            rr, sr = r.highpass_sd_hu / rs.highpass_sd_hu, s.highpass_sd_hu / ss.highpass_sd_hu
            row.update(
                pair_ratio_real=round(rr, 2),
                pair_ratio_sim=round(sr, 2),
                pair_ratio_error_pct=round(100 * (sr / rr - 1), 1),
            )
        rows.append(row)
    if out_dir is not None:
        curves, styles = {}, {}
        for m in members:
            r, s = figs[m.folder]
            curves[f"{m.domain} real"] = (r.nps_freq, r.nps)
            curves[f"{m.domain} simulated"] = (s.nps_freq, s.nps)
            styles[f"{m.domain} simulated"] = "--"
        plot_nps(
            out_dir / f"nps_{members[0].group}.png",
            curves,
            styles=styles,
            title=f"{members[0].group}: real (solid) vs simulated (dashed), same anatomy, matched noise",
        )
        sharp = [m for m in members if not m.smooth]
        if sharp:
            rs, ss = figs[smooth.folder]
            r, s = figs[sharp[0].folder]
            plot_nps(
                out_dir / f"nps_ratio_{members[0].group}.png",
                {
                    "real": (r.nps_freq, r.nps / np.maximum(rs.nps, 1e-9)),
                    "simulated": (s.nps_freq, s.nps / np.maximum(ss.nps, 1e-9)),
                },
                styles={"simulated": "--"},
                ylabel="NPS sharp / NPS smooth",
                title=f"{members[0].group}: NPS ratio {sharp[0].domain} / {smooth.domain}",
            )
    return rows


def example_figure(root: Path, path: Path, slice_index: int = 20) -> Path | None:
    """PNG: a real Philips chest pair slice, the object made from its B member, and three emulations at
    the pair's dose (150 x 150 px crop, lung window); None when the pair is not under ``root``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from TextureStarGANCore.volume_io import read_volume
    from Training.simulator.catalogue import select
    from Training.simulator.simulate_anatomy import resample_object

    b_dir, l_dir = (root / m.folder for m in REAL_SERIES[:2])
    if not (b_dir.is_dir() and l_dir.is_dir()):
        return None
    vb, vl = read_volume(b_dir), read_volume(l_dir)
    px = float(vb.spacing[0])
    cals = A.CalibrationCache()
    src = catalogue_kernel("PHILIPS_B")
    obj = A.attenuation_map(vb.hu[slice_index], px, src, cals.get(src, px))
    specs = select("PHILIPS_B,PHILIPS_L,SIEMENS_I30f_3")
    size = obj.shape[0]
    grid = resample_object(obj, px, ((size - 1) / 2.0, (size - 1) / 2.0), size, px, 0.0, 1.0)
    sims = A.reconstruct_kernels(grid, px, specs, cals, A.photons(1.0, 5.0), np.random.default_rng(0))
    panels = [("real B", vb.hu[slice_index]), ("real L", vl.hu[slice_index]), ("object (from real B)", obj)]
    panels += [(f"simulated {name}", img) for name, img in sims.items()]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.3))
    r0, c0 = 200, 190
    for ax, (title, img) in zip(axes.ravel(), panels, strict=True):
        ax.imshow(
            img[r0 : r0 + 150, c0 : c0 + 150], cmap="gray", vmin=-1000, vmax=300, interpolation="nearest"
        )
        ax.set_title(title, fontsize=11)
        ax.axis("off")
    fig.suptitle(
        "Philips Brilliance16 chest, one slice (150 x 150 px at 0.84 mm, window -1000..300 HU): real pair, "
        "object, emulations at the pair's dose",
        fontsize=10,
    )
    fig.tight_layout()
    write_figure_png(fig, path, dpi=60)
    return path


def fit_pairs(root: Path, count: int = 16) -> dict[str, list]:
    """Refit the paired kernels' windows on the first half of each pair's slices (``fit.fit_windows``)."""
    from TextureStarGANCore.volume_io import read_volume
    from Training.simulator.fit import fit_windows

    out = {}
    for group in sorted(PAIRS):
        members = [m for m in REAL_SERIES if m.group == group]
        vols = {m.folder: read_volume(root / m.folder) for m in members}
        smooth = next(m for m in members if m.smooth)
        idx = _slices(vols[smooth.folder].hu.shape[0], "first", count)
        ref = vols[smooth.folder].hu[idx]
        px = float(vols[smooth.folder].spacing[0])
        figs = [measure_slices(vols[m.folder].hu[idx], px, ref) for m in members]
        windows, _ = fit_windows(figs, px)
        out[group] = [{"domain": m.domain, "window": list(w)} for m, w in zip(members, windows, strict=True)]
    return out


def realism(
    real_root: str | Path,
    out: str | Path,
    *,
    slices: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Write ``realism.csv``, ``realism.md``, ``realism.json``, NPS PNGs and ``anatomy_example.png`` into
    ``out``; returns the rows."""
    root, out = Path(real_root), Path(out)
    if not root.is_dir():
        raise ValueError(f"real CT folder {root} not found")
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[RealSeries]] = {}
    for m in REAL_SERIES:
        if (root / m.folder).is_dir():
            groups.setdefault(m.group, []).append(m)
    if not groups:
        raise ValueError(f"none of the shared real series is under {root}")
    rows = []
    for i, (group, members) in enumerate(groups.items()):
        data = simulate_group(members, root, "second" if group in PAIRS else "all", slices)
        for row, m in zip(compare_group(members, data, out), members, strict=True):
            # Noise amplitude a at REFERENCE_PHOTONS means a dose of 1 / a^2 relative to the reference.
            rows.append({**row, "matched_dose_rel": round(1.0 / max(data[m.folder][3], 1e-9) ** 2, 3)})
        if progress:
            progress(i + 1, len(groups))
    cols = [*TABLE_COLUMNS, "matched_dose_rel"]
    write_csv_atomic(out / "realism.csv", cols, [[r[c] for c in cols] for r in rows])
    write_json_atomic(out / "realism.json", rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    write_text_atomic(out / "realism.md", "\n".join(lines) + "\n")
    example_figure(root, out / "anatomy_example.png")
    return rows
