"""Run a chain of dictionary transforms only for items that carry a given key.

The classification bundles take scans with or without a lung mask in the same datalist: with one
(``lung_mask``), the lung slices are selected and masked; without, every slice is used. The volume
transforms need the mask key when they run, and MONAI has no "if this key is present" composition, so
this wrapper decides per item.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from monai.transforms import Compose, MapTransform, Transform

__all__ = ["ApplyIfKeyPresentd"]


class ApplyIfKeyPresentd(Transform):
    """Apply ``transforms`` (composed in order) when ``key`` is in the item and not ``None``; else pass it on.

    Args:
        key: the key whose presence switches the chain on (e.g. ``"lung_mask"``).
        transforms: dictionary transforms to run, in order.
        drop_keys: keys removed from the output after the chain ran (e.g. intermediate per-slice
            probabilities, so items with and without a mask collate alike).
    """

    def __init__(
        self, key: Hashable, transforms: Sequence[MapTransform], drop_keys: Sequence[Hashable] = ()
    ) -> None:
        self.key = key
        self.chain = Compose(list(transforms))
        self.drop_keys = tuple(drop_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if d.get(self.key) is None:
            d.pop(self.key, None)
            return d
        d = dict(self.chain(d))
        for k in self.drop_keys:
            d.pop(k, None)
        return d
