"""What the two segmenting stages share: a 2D network run slice by slice, its probabilities resized back to
the input grid and thresholded there (lungs: :mod:`.lungs`; lesions: :mod:`.infection`)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ctcovid.ct.mask_cleanup import mask_postprocessing

from .base import Stage

__all__ = ["SliceSegmentationStage"]


class SliceSegmentationStage(Stage):
    """A stage whose network segments each axial slice (``in_plane_size`` and clean-up from its bundle)."""

    def setup(self, pipeline) -> None:
        model = pipeline.models[self.model]
        if not model.available:
            return
        #: in-plane size the network runs at, from its bundle (config or metadata ``spatial_shape``)
        shape = model.config_value("spatial_size", "image_size", "roi_size") or model.input_shape()
        if not shape:
            raise ValueError(
                f"bundle {model.bundle}: no input size (network_data_format.inputs.image.spatial_shape)"
            )
        self.size = (int(shape[-2]), int(shape[-1]))
        #: the bundle's label clean-up transforms (e.g. KeepLargestConnectedComponentd)
        self.cleanup = mask_postprocessing(model)

    def prepare_batch(self, pipeline, batch: torch.Tensor) -> torch.Tensor:
        """The ``(B, 1, H, W)`` resized slices as the network reads them (a stage may equalise them here)."""
        return batch

    def segment(self, pipeline, image: torch.Tensor) -> np.ndarray:
        """``(1, X, Y, Z)`` in [0, 1] -> ``(X, Y, Z)`` uint8 mask in the input grid, before clean-up.

        Slices are resized to the network's size, the class probabilities resized back (bilinear) and
        arg-maxed there, as the bundle's ``Activationsd`` + ``Invertd`` + ``AsDiscreted`` do, so the mask
        is as smooth as the probabilities rather than blocky. With two classes only P(foreground) is
        resized and thresholded at 0.5: the same decision (resizing is linear, so the two stay
        complementary) at half the cost.
        """
        network = pipeline.models[self.model].network
        runner = pipeline.runner
        x_size = tuple(image.shape[1:3])
        mask = np.zeros(tuple(image.shape[1:]), dtype=np.uint8)
        with torch.inference_mode():
            for start, batch in runner.slice_batches(image, self.size, self.model):
                batch = self.prepare_batch(pipeline, batch)
                with runner.autocast():
                    logits = network(batch)
                logits = logits.float()
                if logits.shape[1] == 2:
                    prob = torch.sigmoid(logits[:, 1:] - logits[:, :1])  # = softmax(logits)[:, 1:]
                else:
                    prob = torch.softmax(logits, dim=1)
                if tuple(prob.shape[-2:]) != x_size:
                    prob = F.interpolate(prob, size=x_size, mode="bilinear", align_corners=False)
                lab = prob[:, 0] > 0.5 if prob.shape[1] == 1 else prob.argmax(dim=1) > 0  # any foreground
                lab = lab.to(torch.uint8).cpu().numpy()  # (B, X, Y)
                mask[:, :, start : start + lab.shape[0]] = lab.transpose(1, 2, 0)
        return mask
