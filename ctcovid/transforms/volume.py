"""Volume building for the CT networks: lung masking and depth resampling (lung-slice selection is
:mod:`ctcovid.transforms.slice_selection`).

Input volumes are channel-first ``(1, X, Y, Z)`` tensors (MetaTensors from ``ctcovid.io.load_ct``) whose
last axis is the slice axis: slice ``k`` is ``img[0, :, :, k]``.

Typical dictionary chain (the pipeline default when no slice-filter weights are given)::

    LungSlicesFromMaskd("lung_mask", output_key="slice_lung_prob")   # or slice-filter probabilities
    SelectLungSlicesd(["image", "lung_mask"], prob_key="slice_lung_prob")
    MaskToLungd("image", mask_key="lung_mask")                           # severity only
    BuildSeverityInputd("image")            # -> (48, 299, 299); BuildDetectionInputd -> (64, 224, 224)

The network inputs put depth on the channel axis: ``(depth, H, W)``, row ``h`` runs along X and column
``w`` along Y of the source slices.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_tensor, ensure_tuple_rep

from ctcovid.io.errors import CTInputError, NoLungSlicesError

from .volume_checks import as_volume_tensor, source_name

__all__ = [
    "MaskToLung",
    "MaskToLungd",
    "ResampleSlices",
    "ResampleSlicesd",
    "BuildDetectionInput",
    "BuildDetectionInputd",
    "BuildSeverityInput",
    "BuildSeverityInputd",
]

#: Meta-data key holding the original indices of the kept slices, as a comma-separated string
#: (e.g. ``"12,13,14"``): a string, unlike a list, collates across scans with different slice counts.
class MaskToLung(Transform):
    """Keep the lung: voxels outside the lung mask are set to ``background``.

    Args:
        background: value outside the lung (0 suits images normalised to [0, 1]).
        mask_threshold: mask voxels ``> mask_threshold`` are lung.

    ``__call__(img, mask)``: ``img`` ``(C, X, Y, Z)``; ``mask`` of the same shape or with one channel
    (broadcast over the image channels). Returns the masked image (float dtype kept; integer images
    become float32), meta data kept.

    Raises:
        CTInputError: the mask does not match the image's spatial shape (the message names the scan).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, background: float = 0.0, mask_threshold: float = 0.5) -> None:
        self.background = float(background)
        self.mask_threshold = float(mask_threshold)

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor) -> torch.Tensor:
        img = as_volume_tensor(img)
        return self.apply(img, self.checked_mask(img, mask))

    def checked_mask(self, img: torch.Tensor, mask: NdarrayOrTensor) -> torch.Tensor:
        """``mask`` as a tensor on ``img``'s device; raises ``CTInputError`` if the shapes do not match."""
        mask = convert_to_tensor(mask, track_meta=False, device=img.device)
        if mask.ndim != img.ndim or mask.shape[1:] != img.shape[1:] or mask.shape[0] not in (1, img.shape[0]):
            raise CTInputError(
                source_name(img),
                f"lung mask shape {tuple(mask.shape)} does not match image shape {tuple(img.shape)}",
            )
        return mask

    def apply(self, img: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The masking itself, elementwise (so it can run piece by piece), on already checked inputs."""
        dtype = img.dtype if img.is_floating_point() else torch.float32
        background = torch.tensor(self.background, dtype=dtype, device=img.device)
        return torch.where(mask > self.mask_threshold, img.to(dtype), background)


class MaskToLungd(MapTransform):
    """Dictionary twin of :class:`MaskToLung`.

    Args:
        keys: images to mask.
        mask_key: key of the lung mask.
        background, mask_threshold: see :class:`MaskToLung`.
        allow_missing_keys: don't raise if a key is missing.
    """

    backend = MaskToLung.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "lung_mask",
        background: float = 0.0,
        mask_threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.masker = MaskToLung(background, mask_threshold)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.masker(d[key], d[self.mask_key])
        return d


def _resample_depth(x: torch.Tensor, depth: int) -> torch.Tensor:
    """``(X, Y, Z)`` -> ``(X, Y, depth)``: linear along Z, first and last slices kept (align_corners)."""
    rows, cols, n = x.shape
    if n == depth:
        return x
    out = F.interpolate(x.reshape(1, rows * cols, n), size=depth, mode="linear", align_corners=True)
    return out.reshape(rows, cols, depth)


def _resample_plane(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(X, Y, Z)`` -> ``(H, W, Z)``: bilinear in-plane (pixel centres, antialias off), slices as channels."""
    if tuple(x.shape[:2]) == size:
        return x
    out = F.interpolate(
        x.permute(2, 0, 1).unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=False
    )
    return out[0].permute(1, 2, 0)


class ResampleSlices(Transform):
    """Resample a stack of slices to ``(depth, H, W)``, depth as channels, for the 2D networks.

    Depth is interpolated linearly along the slice axis with the first and last slices mapped onto the
    first and last output slices (``align_corners=True``: 3 slices valued 0, 1, 2 become 0, 0.5, 1,
    1.5, 2 at depth 5), so no slice is dropped or duplicated as nearest-neighbour would; fewer slices
    than ``depth`` are interpolated up and a single slice is repeated. In-plane resizing is bilinear on
    pixel centres (``align_corners=False``) without antialiasing (cheaper; the networks are trained on
    the same resampling). Both are separable linear maps, done in whichever order is cheaper, in float32
    on the input's device.

    Args:
        depth: output slices.
        spatial_size: output ``(H, W)`` (an int means square).

    ``__call__(img)``: ``(1, X, Y, Z)`` (or ``(X, Y, Z)``) -> ``(depth, H, W)`` float32; a MetaTensor keeps
    its meta data except the affine (the output is a network input, not an image in space).
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, depth: int = 64, spatial_size: Sequence[int] | int = (224, 224)) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = int(depth)
        self.spatial_size = tuple(int(s) for s in ensure_tuple_rep(spatial_size, 2))

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        img = as_volume_tensor(img)
        (out,) = _build_stacks(self.volume(img), [self])
        return self.wrap(out, img)

    def volume(self, img: torch.Tensor) -> torch.Tensor:
        """The ``(X, Y, Z)`` plain tensor of a checked ``(1, X, Y, Z)`` or ``(X, Y, Z)`` input."""
        if img.ndim == 4:
            if img.shape[0] != 1:
                raise CTInputError(
                    source_name(img), f"ResampleSlices needs one channel, got shape {tuple(img.shape)}"
                )
            vol = img[0]
        elif img.ndim == 3:
            vol = img
        else:
            raise CTInputError(
                source_name(img), f"ResampleSlices needs a (1, X, Y, Z) volume, got shape {tuple(img.shape)}"
            )
        if vol.shape[-1] == 0:
            raise NoLungSlicesError(source_name(img), "no slices to resample")
        return vol.as_tensor() if isinstance(vol, MetaTensor) else vol

    @staticmethod
    def wrap(out: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """``(H, W, depth)`` -> ``(depth, H, W)``, a MetaTensor with ``img``'s meta data (less the affine)
        when ``img`` is one."""
        out = out.permute(2, 0, 1).contiguous()
        if isinstance(img, MetaTensor) and get_track_meta():
            meta = {k: v for k, v in img.meta.items() if k != "affine"}
            return MetaTensor(out, meta=meta)
        return out

    def depth_first(self, shape: Sequence[int]) -> bool:
        """Whether resampling depth before the plane gives the smaller intermediate for an (X, Y, Z) input."""
        rows, cols, n = shape
        h, w = self.spatial_size
        return self.depth * rows * cols < n * h * w


#: Rows (depth-first) or slices (plane-first) per piece in :func:`_build_stacks`.
_PIECE = 32


def _build_stacks(
    vol: torch.Tensor,
    resamplers: Sequence[ResampleSlices],
    mask: torch.Tensor | None = None,
    masker: MaskToLung | None = None,
    depth_first: bool | None = None,
) -> list[torch.Tensor]:
    """``(X, Y, Z)`` volume -> each resampler's ``(H, W, depth)`` float32, lung-masked first if ``mask``
    (``(X, Y, Z)``, checked) is given.

    Both resampling steps are separable: depth resampling treats every (x, y) column on its own, in-plane
    resampling every slice on its own. So the masking and the first step run piece by piece along the
    axis that step leaves independent (rows X when depth comes first, slices Z when the plane does) and
    only the small first-step results are joined: the masked float32 volume is never held whole (315 MB
    for 300 slices of 512x512; it was the pipeline's peak) and the numbers are those of masking the whole
    volume first. Resamplers that share an order share the masked pieces. ``depth_first`` forces an
    order (default: each resampler's cheaper one, :meth:`ResampleSlices.depth_first`).
    """
    out: list[torch.Tensor | None] = [None] * len(resamplers)
    order = [r.depth_first(vol.shape) if depth_first is None else depth_first for r in resamplers]
    for first_depth in (True, False):
        group = [i for i in range(len(resamplers)) if order[i] == first_depth]
        if not group:
            continue
        axis = 0 if first_depth else 2
        parts: dict[int, list[torch.Tensor]] = {i: [] for i in group}
        for start in range(0, vol.shape[axis], _PIECE):
            piece = vol.narrow(axis, start, min(_PIECE, vol.shape[axis] - start))
            if mask is not None and masker is not None:  # (ResampleSlices alone passes neither)
                piece = masker.apply(piece, mask.narrow(axis, start, piece.shape[axis]))
            piece = piece.to(torch.float32)
            for i in group:
                r = resamplers[i]
                step = _resample_depth(piece, r.depth) if first_depth else _resample_plane(piece, r.spatial_size)
                parts[i].append(step)
        for i in group:
            r = resamplers[i]
            first = torch.cat(parts[i], dim=axis)
            out[i] = (
                _resample_plane(first, r.spatial_size)
                if first_depth
                else _resample_depth(first.contiguous(), r.depth)
            )
    return out  # type: ignore[return-value]


class ResampleSlicesd(MapTransform):
    """Dictionary twin of :class:`ResampleSlices`."""

    backend = ResampleSlices.backend

    def __init__(
        self,
        keys: KeysCollection,
        depth: int = 64,
        spatial_size: Sequence[int] | int = (224, 224),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.resampler = ResampleSlices(depth, spatial_size)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.resampler(d[key])
        return d


class BuildDetectionInput(Transform):
    """Detection-network input from the kept lung slices: ``(depth, H, W)``, paper size ``(64, 224, 224)``.

    Args:
        depth: slices of the stack.
        spatial_size: in-plane size ``(H, W)``.
        background, mask_threshold: used when a lung mask is given (see :class:`MaskToLung`).

    ``__call__(img, mask=None)``: ``img`` ``(1, X, Y, K)`` kept slices (after :class:`SelectLungSlices`);
    with ``mask`` the non-lung voxels are set to ``background`` first.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        depth: int = 64,
        spatial_size: Sequence[int] | int = (224, 224),
        background: float = 0.0,
        mask_threshold: float = 0.5,
    ) -> None:
        self.masker = MaskToLung(background, mask_threshold)
        self.resampler = ResampleSlices(depth, spatial_size)

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> torch.Tensor:
        return _masked_stacks(img, mask, self.masker, [self.resampler])[0]


class BuildSeverityInput(Transform):
    """Severity-network input: the kept slices resampled to each depth, concatenated on channels.

    Paper size: ``depths=(32, 16)``, ``(299, 299)`` -> ``(48, 299, 299)`` whose first 32 channels are the
    32-slice stack and last 16 the 16-slice stack (what :class:`ctcovid.networks.SeverityMember` splits).

    Args:
        depths: depth of each stack.
        spatial_size: in-plane size ``(H, W)``.
        background, mask_threshold: used when a lung mask is given (see :class:`MaskToLung`).

    ``__call__(img, mask=None)``: ``img`` ``(1, X, Y, K)`` kept slices, lung-masked already or masked here
    with ``mask``. Returns ``(sum(depths), H, W)`` float32.
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        depths: Sequence[int] = (32, 16),
        spatial_size: Sequence[int] | int = (299, 299),
        background: float = 0.0,
        mask_threshold: float = 0.5,
    ) -> None:
        self.masker = MaskToLung(background, mask_threshold)
        self.resamplers = [ResampleSlices(d, spatial_size) for d in depths]

    def __call__(self, img: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> torch.Tensor:
        return torch.cat(_masked_stacks(img, mask, self.masker, self.resamplers), dim=0)


def _masked_stacks(
    img: NdarrayOrTensor, mask: NdarrayOrTensor | None, masker: MaskToLung, resamplers: Sequence[ResampleSlices]
) -> list[torch.Tensor]:
    """Each resampler's ``(depth, H, W)`` stack of ``img``, lung-masked by ``masker`` when ``mask`` is given
    (the body of the ``Build*Input`` transforms; :func:`_build_stacks` does the work)."""
    img = as_volume_tensor(img)
    vol = resamplers[0].volume(img)
    if mask is not None:
        mask = masker.checked_mask(img, mask)
        mask = mask[0] if mask.ndim == 4 else mask
    stacks = _build_stacks(vol, resamplers, mask, masker)
    return [r.wrap(out, img) for r, out in zip(resamplers, stacks)]


class _StackBuilderd(MapTransform):
    """Shared body of the ``Build*Inputd`` twins: apply ``builder(image, mask)`` over ``keys``, the mask
    read from ``mask_key`` when it is given."""

    def __init__(self, keys: KeysCollection, mask_key: str | None, builder, allow_missing_keys: bool) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.builder = builder

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.builder(d[key], None if self.mask_key is None else d[self.mask_key])
        return d


class BuildDetectionInputd(_StackBuilderd):
    """Dictionary twin of :class:`BuildDetectionInput`; ``mask_key`` (optional) names the lung mask."""

    backend = BuildDetectionInput.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        depth: int = 64,
        spatial_size: Sequence[int] | int = (224, 224),
        background: float = 0.0,
        mask_threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        builder = BuildDetectionInput(depth, spatial_size, background, mask_threshold)
        super().__init__(keys, mask_key, builder, allow_missing_keys)


class BuildSeverityInputd(_StackBuilderd):
    """Dictionary twin of :class:`BuildSeverityInput`; ``mask_key`` (optional) names the lung mask."""

    backend = BuildSeverityInput.backend

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        depths: Sequence[int] = (32, 16),
        spatial_size: Sequence[int] | int = (299, 299),
        background: float = 0.0,
        mask_threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        builder = BuildSeverityInput(depths, spatial_size, background, mask_threshold)
        super().__init__(keys, mask_key, builder, allow_missing_keys)
