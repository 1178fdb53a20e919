"""PNG montage of a scan's kept lung slices with the lung contour, the lesions (infection mask) and the
Grad-CAM heat map.

Drawn with matplotlib's object API on an Agg canvas (no pyplot state, safe in worker threads) and written
atomically. Slices are shown in radiological convention when the affine says how: patient anterior up,
patient right on the image left (axial planes only; other planes are shown as stored).
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ctcovid.io.atomic import write_bytes_atomic

__all__ = ["display_slice", "pick_montage_slices", "save_montage_png"]


def display_slice(plane: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
    """Turn an ``(X, Y)`` axial slice into display order ``(rows, cols)``.

    With a RAS ``affine`` (MONAI / nibabel convention) the output's rows run anterior -> posterior and its
    columns patient right -> left. Without an affine, or when the first two array axes are not the two
    in-plane world axes, the slice is shown transposed as stored (rows along Y).
    """
    out = np.asarray(plane).T  # rows follow array axis 1, columns array axis 0
    if affine is None:
        return out
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    worlds = (int(ornt[0, 0]), int(ornt[1, 0]))
    if sorted(worlds) != [0, 1]:  # not an axial plane: leave it alone
        return out
    if worlds == (1, 0):  # array axis 0 runs along world y: swap so columns follow world x
        out = out.T
        flip_col, flip_row = ornt[1, 1], ornt[0, 1]
    else:
        flip_col, flip_row = ornt[0, 1], ornt[1, 1]
    # RAS: +x = patient left->right, +y = posterior->anterior. Display wants columns right->left
    # (decreasing x: flip where the array runs along +x) and rows anterior->posterior (decreasing y).
    if flip_col > 0:
        out = out[:, ::-1]
    if flip_row > 0:
        out = out[::-1, :]
    return np.ascontiguousarray(out)


def pick_montage_slices(
    kept: Sequence[int], max_tiles: int = 16, lesion_area: Sequence[float] | None = None
) -> list[int]:
    """At most ``max_tiles`` of the kept slice indices, in slice order.

    Without ``lesion_area`` (or with no lesion) they are evenly spread, first and last included. With
    ``lesion_area`` (per kept slice, e.g. infection voxels), half the tiles go to the slices with the
    most lesion, the rest are spread evenly over the remaining slices, so lesions are seen in context.
    """
    kept = list(kept)
    if len(kept) <= max_tiles:
        return kept
    chosen: set[int] = set()
    if lesion_area is not None and np.any(np.asarray(lesion_area) > 0):
        area = np.asarray(lesion_area, dtype=np.float64)
        top = [i for i in np.argsort(-area, kind="stable")[: max_tiles // 2] if area[i] > 0]
        chosen.update(int(i) for i in top)
    rest = [i for i in range(len(kept)) if i not in chosen]
    need = max_tiles - len(chosen)
    chosen.update(rest[j] for j in np.linspace(0, len(rest) - 1, need).round().astype(int))
    return [kept[i] for i in sorted(chosen)]


def save_montage_png(
    path: str | os.PathLike,
    image: np.ndarray,
    mask: np.ndarray,
    slices: Sequence[int],
    affine: np.ndarray | None = None,
    heatmap: np.ndarray | None = None,
    infection: np.ndarray | None = None,
    title: str = "",
    note: str = "",
    tile_inches: float = 2.4,
) -> Path:
    """Draw the montage and write it as PNG (atomically).

    Args:
        path: PNG file to write.
        image: ``(X, Y, Z)`` intensities scaled to [0, 1].
        mask: ``(X, Y, Z)`` lung mask (non-zero = lung); its contour is drawn in green.
        slices: slice indices (along Z) to show, one tile each.
        affine: 4x4 RAS affine of the volume, for radiological display orientation.
        heatmap: ``(X, Y)`` Grad-CAM map in [0, 1] drawn over every tile (the detection ensemble sees the
            slices as channels of one 2D input, so it has one in-plane map per scan), or ``None``.
        infection: ``(X, Y, Z)`` lesion mask, filled in translucent red with a red contour, or ``None``.
        title: first heading line (scan id, prediction ...).
        note: second heading line (what is missing, e.g. "detection skipped: ...").
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    slices = list(slices)
    n = max(len(slices), 1)
    ncols = min(n, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    fig_w = max(ncols * tile_inches, 6.0)
    # wrap the heading to the figure width (about 6.5 px per character at font size 9, 100 dpi)
    heading = [line for t in (title, note) if t for line in textwrap.wrap(t, width=int(fig_w * 100 / 6.5))]
    head_in = 0.3 + 0.18 * len(heading)  # inches of heading text above the tiles
    fig_h = nrows * (tile_inches + 0.2) + head_in
    fig = Figure(figsize=(fig_w, fig_h), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - head_in / fig_h, wspace=0.04, hspace=0.12)
    heat_rgba = None
    if heatmap is not None:
        h = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
        heat_rgba = colormaps["jet"](display_slice(h, affine))
        heat_rgba[..., 3] = 0.5 * display_slice(h, affine)  # transparent where the map is cold
    for i in range(nrows * ncols):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_axis_off()
        if i >= len(slices):
            continue
        k = slices[i]
        ax.imshow(
            display_slice(image[:, :, k], affine), cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear"
        )
        if heat_rgba is not None:
            ax.imshow(heat_rgba, interpolation="bilinear")
        m = display_slice(np.asarray(mask[:, :, k]) > 0, affine).astype(np.float32)
        if m.any() and not m.all():
            ax.contour(m, levels=[0.5], colors="lime", linewidths=0.8)
        if infection is not None:
            les = display_slice(np.asarray(infection[:, :, k]) > 0, affine)
            if les.any():
                rgba = np.zeros((*les.shape, 4), dtype=np.float32)
                rgba[les] = (1.0, 0.1, 0.1, 0.45)
                ax.imshow(rgba, interpolation="nearest")
                ax.contour(les.astype(np.float32), levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(f"slice {k}", fontsize=8)
    if not slices:
        fig.axes[0].text(
            0.5, 0.5, "no slices to show", ha="center", va="center", transform=fig.axes[0].transAxes
        )
    if heading:
        fig.suptitle("\n".join(heading), fontsize=9, ha="left", x=0.01, y=1 - 0.05 / fig_h, va="top")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    # artists and axes refer to each other: without clearing, the tiles' image arrays (~140 MB for 16
    # tiles of 512x512) wait for the cyclic garbage collector instead of being freed here
    fig.clear()
    return write_bytes_atomic(buf.getvalue(), path)
