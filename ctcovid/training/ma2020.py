"""Where the Ma et al. 2D slices (``ct/ma2020_slices``) come from: estimated patient groups and MedSeg matches.

The 2D derivative lost patient identity, but its files are numbered in volume order (every third slice
of each source volume). Its 10 Radiopaedia volumes are the MedSeg volumes (same cases), so some slices
are copies of slices of ``ct/medseg`` volumes; training on them while testing on that volume would leak.
Nothing in MONAI does this bookkeeping, so it is written here:

1. **Matches**: every ma2020 slice is compared with every MedSeg slice at 64x64 under the 8 in-plane
   orientations (the derivative rotated and flipped some slices); a slice is a copy when its lung mask
   overlaps a MedSeg slice mask with Dice >= ``match_dice`` *and* the images correlate >= ``match_corr``.
2. **Groups** (estimated patients): consecutive files start a new group when the image correlation drops
   below ``split_corr`` or the lung-mask Dice below ``split_dice`` (a jump to another volume), or when the
   matched MedSeg volume changes. A group holding a match is labelled with that volume (``"rp8"``), else
   with its first file (``"ma0000"``).

Checked by eye on the data at hand: the ten coronacases volumes come out as ten groups (files
0000-1245), and the matched groups are rp2 (1248-1257, plus 1260-1374 = the 1 mm series of the same
patient), rp6 (1476), rp8 (1488-1509) and rp4 (1566-1584).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctcovid.io import load_ct

__all__ = ["Ma2020Slice", "analyse_ma2020", "dihedral"]

#: Size the comparison runs at (speed; lung outlines still match to a few per cent of Dice).
_MATCH_SIZE = 64


@dataclass
class Ma2020Slice:
    """One ma2020 slice: file name, estimated patient group and, if it copies a MedSeg slice, which one."""

    name: str
    group: str
    medseg_case: str | None = None
    medseg_slice: int | None = None
    match_dice: float = 0.0
    match_corr: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k``-th (0..7) of the 8 in-plane orientations of a 2D array (4 rotations, then mirrored)."""
    y = np.rot90(x, k % 4)
    return np.fliplr(y) if k >= 4 else y


def _shrink(stack: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 64, 64) float32 by area averaging."""
    t = torch.as_tensor(np.ascontiguousarray(stack), dtype=torch.float32)[:, None]
    return F.interpolate(t, size=(_MATCH_SIZE, _MATCH_SIZE), mode="area")[:, 0].numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def _read_slice(path: Path) -> np.ndarray:
    """A PNG slice as (X, Y) float32, the layout ``load_ct`` gives volumes (slice k = ``img[0, :, :, k]``)."""
    return np.asarray(load_ct(path, allow_2d=True, domain="display"))[0, :, :, 0]


def analyse_ma2020(
    ma_dir: str | os.PathLike,
    medseg: Mapping[str, tuple[str | os.PathLike, str | os.PathLike]],
    match_dice: float = 0.95,
    match_corr: float = 0.8,
    split_corr: float = 0.5,
    split_dice: float = 0.6,
) -> list[Ma2020Slice]:
    """Group the ma2020 slices into estimated patients and find the ones copied from MedSeg volumes.

    Args:
        ma_dir: the ``ma2020_slices`` folder (``ct/*.png`` images, ``lungs/*.png`` masks 0/255).
        medseg: ``{case: (image path, lung mask path)}`` of the MedSeg volumes to match against.
        match_dice, match_corr: a copy needs both mask Dice and image correlation at least this high.
        split_corr, split_dice: a new group starts where consecutive files fall below either.

    Returns:
        one :class:`Ma2020Slice` per file, in file order.
    """
    ma_dir = Path(ma_dir)
    names = sorted(p.name for p in (ma_dir / "lungs").glob("*.png"))
    if not names:
        raise FileNotFoundError(f"{ma_dir / 'lungs'}: no PNG lung masks")
    ma_img = np.stack([_read_slice(ma_dir / "ct" / n) for n in names])
    ma_msk = np.stack([_read_slice(ma_dir / "lungs" / n) > 127 for n in names])
    ma_img_s, ma_msk_s = _shrink(ma_img), _shrink(ma_msk.astype(np.float32)) > 0.5

    ref_ids: list[tuple[str, int]] = []
    ref_img, ref_msk = [], []
    for case, (img_path, msk_path) in medseg.items():
        img = np.asarray(load_ct(img_path))[0]
        msk = np.asarray(load_ct(msk_path))[0] > 0.5
        for k in range(img.shape[2]):
            ref_ids.append((case, k))
            ref_img.append(img[:, :, k])
            ref_msk.append(msk[:, :, k])
    ref_img_s = _shrink(np.stack(ref_img))
    ref_msk_s = _shrink(np.stack(ref_msk).astype(np.float32)) > 0.5
    ref_flat = ref_msk_s.reshape(len(ref_ids), -1).astype(np.float32)
    ref_area = ref_flat.sum(1)

    out: list[Ma2020Slice] = []
    for i, name in enumerate(names):
        best = (-1.0, 0, 0)  # (dice, reference index, orientation)
        for k in range(8):
            m = dihedral(ma_msk_s[i], k).reshape(-1).astype(np.float32)
            dice = 2 * (ref_flat @ m) / (ref_area + m.sum() + 1e-6)
            j = int(np.argmax(dice))
            if dice[j] > best[0]:
                best = (float(dice[j]), j, k)
        dice, j, k = best
        corr = _corr(dihedral(ma_img_s[i], k), ref_img_s[j])
        rec = Ma2020Slice(name=name, group="", match_dice=round(dice, 4), match_corr=round(corr, 4))
        if dice >= match_dice and corr >= match_corr:
            rec.medseg_case, rec.medseg_slice = ref_ids[j]
        out.append(rec)

    # consecutive-file continuity -> groups
    groups: list[list[int]] = [[0]]
    for i in range(1, len(names)):
        jump = (
            _corr(ma_img[i - 1], ma_img[i]) < split_corr
            or _dice(ma_msk[i - 1], ma_msk[i]) < split_dice
            or out[i - 1].medseg_case != out[i].medseg_case
            and None not in (out[i - 1].medseg_case, out[i].medseg_case)
        )
        if jump:
            groups.append([i])
        else:
            groups[-1].append(i)
    for members in groups:
        cases = sorted({out[i].medseg_case for i in members if out[i].medseg_case})
        label = "+".join(cases) if cases else "ma" + Path(names[members[0]]).stem
        for i in members:
            out[i].group = label
    return out


def group_members(records: Sequence[Ma2020Slice]) -> dict[str, list[str]]:
    """``{group: [file names]}`` in file order."""
    groups: dict[str, list[str]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r.name)
    return groups
