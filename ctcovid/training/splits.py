"""Patient-level splits, class balance and datalist parts: what every classification bundle's training uses.

A datalist item is a dict with at least ``image`` and ``label`` (an int) and, for grouping, a patient key.
Splits never put one patient in two parts (images of one patient are not independent).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "balanced_subset",
    "class_balance",
    "class_weights",
    "fold_parts",
    "group_split",
    "load_parts",
    "patient_kfold",
    "sample_weights",
]


def group_split(
    items: Sequence[dict],
    fractions: dict[str, float],
    group_key: str = "patient",
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Split ``items`` into named parts so that no group (patient) is in two parts.

    Groups are stratified by their sorted set of labels; within a stratum, groups are shuffled with
    ``seed`` and each goes to the part whose image count is furthest below its target fraction (every
    part first receives one group while the stratum has enough groups, so rare classes reach all parts).

    Args:
        items: dicts with ``label`` and ``group_key`` entries.
        fractions: part name -> fraction of the images (normalised to sum 1), in output order.
        group_key: item key naming the group.
        seed: shuffling seed.
    """
    names = list(fractions)
    total = float(sum(fractions.values()))
    target = {k: v / total for k, v in fractions.items()}
    groups: dict[str, list[dict]] = defaultdict(list)
    for it in items:
        groups[str(it[group_key])].append(it)
    strata: dict[tuple, list[str]] = defaultdict(list)
    for g, members in groups.items():
        strata[tuple(sorted({m["label"] for m in members}))].append(g)
    rng = random.Random(seed)
    out: dict[str, list[dict]] = {k: [] for k in names}
    for key in sorted(strata):
        gids = sorted(strata[key])
        rng.shuffle(gids)
        counts = dict.fromkeys(names, 0)
        n_total = sum(len(groups[g]) for g in gids)
        for i, g in enumerate(gids):
            if i < len(names) and len(gids) >= len(names):
                # rarest-first guarantee: each part gets a group of this stratum, largest fraction first
                part = sorted(names, key=lambda k: -target[k])[i]
            else:
                part = max(names, key=lambda k: target[k] * n_total - counts[k])
            counts[part] += len(groups[g])
            out[part].extend(groups[g])
    for k in names:
        out[k].sort(key=lambda it: it["image"])
    return out


def balanced_subset(items: Sequence[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` items taken round-robin over classes (each class shuffled with ``seed``), in input order."""
    by_cls: dict[int, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_cls[int(it["label"])].append(i)
    rng = random.Random(seed)
    for idx in by_cls.values():
        rng.shuffle(idx)
    chosen: list[int] = []
    queues = [by_cls[c] for c in sorted(by_cls)]
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(q.pop())
    return [items[i] for i in sorted(chosen)]


def class_weights(items: Sequence[dict], num_classes: int) -> list[float]:
    """Inverse-frequency class weights ``N / (C * n_c)`` (1.0 for a balanced set; absent classes get 0)."""
    counts = Counter(int(it["label"]) for it in items)
    n = sum(counts.values())
    return [n / (num_classes * counts[c]) if counts[c] else 0.0 for c in range(num_classes)]


def sample_weights(items: Sequence[dict], num_classes: int, within: str | None = None) -> list[float]:
    """Per-item weights for ``torch.utils.data.WeightedRandomSampler``: each class drawn equally often and, with
    ``within`` (an item key such as ``"domain"``), each value of that key equally often inside its class, so
    e.g. the children's and the adults' films of one class are drawn as often as each other and a network
    cannot learn the patients' age in place of the class."""
    def cell(it: dict) -> tuple:
        return int(it["label"]), (it.get(within) if within else None)

    labels = Counter(int(it["label"]) for it in items)
    cells = Counter(cell(it) for it in items)
    per_label = Counter(lab for lab, _ in cells)
    n = len(items)
    del num_classes  # classes present in the items are balanced; kept for the configs' call signature
    return [n / (len(labels) * per_label[cell(it)[0]] * cells[cell(it)]) for it in items]


def class_balance(items: Sequence[dict], class_names: Sequence[str]) -> dict[str, int]:
    """Image count per class name."""
    counts = Counter(int(it["label"]) for it in items)
    return {c: counts[i] for i, c in enumerate(class_names)}


def patient_kfold(items: Sequence[dict], k: int = 5, seed: int = 0) -> list[list[dict]]:
    """Split ``items`` into ``k`` folds of about equal image count, stratified by the patient's label set,
    with every patient's images in exactly one fold."""
    if k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2, got {k}")
    parts = group_split(items, {f"fold{i}": 1.0 for i in range(k)}, group_key="patient", seed=seed)
    return [parts[f"fold{i}"] for i in range(k)]


def load_parts(
    datalist_file: str | os.PathLike,
    parts: str | Sequence[str],
    data_root: str | os.PathLike,
    limit: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Items of one or more parts of a datalist, paths made absolute under ``data_root``.

    Args:
        datalist_file: a bundle's ``configs/datalist.json``.
        parts: part name(s), e.g. ``"test"`` or ``["fold1", "fold2"]``.
        data_root: the folder the datalist's paths are relative to (e.g. ``default_data_root("cxr")``).
        limit: keep at most this many items, class-balanced round-robin (reduced CPU runs).
        seed: seed of the reduced selection.
    """
    with open(datalist_file, encoding="utf-8") as f:
        dl = json.load(f)
    names = [parts] if isinstance(parts, str) else list(parts)
    items: list[dict] = []
    for p in names:
        if not isinstance(dl.get(p), list):
            known = [k for k, v in dl.items() if isinstance(v, list)]
            raise KeyError(f"{datalist_file}: no part {p!r} (parts: {known})")
        items.extend(dict(it) for it in dl[p])
    if limit is not None and limit < len(items):
        items = balanced_subset(items, int(limit), seed)
    root = Path(data_root)
    for it in items:
        it["image"] = str(root / it["image"])
        it["name"] = Path(it["image"]).name
    return items


def fold_parts(k: int, held_out: int) -> tuple[list[str], str]:
    """``(training part names, held-out part name)`` of fold ``held_out`` in a ``k``-fold datalist."""
    if not 0 <= held_out < k:
        raise ValueError(f"held_out must be in [0, {k - 1}], got {held_out}")
    return [f"fold{i}" for i in range(k) if i != held_out], f"fold{held_out}"
