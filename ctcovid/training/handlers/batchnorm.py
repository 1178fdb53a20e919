"""Re-estimate batch-norm statistics at the current weights before validation ("precise BN").

Batch norm keeps running averages of batch statistics with momentum 0.1, i.e. over roughly the last ten
iterations. When the weights still move fast (the first epochs, RMSprop at lr 1e-3 as in V-BreathNet) those
averages describe older weights, and the network in eval mode can collapse to one class although it does
well in train mode (seen in a V-BreathNet CPU run after one epoch: every one of 30 validation images called
COVID-19, accuracy 0.33; after re-estimating the statistics on 60 training images, accuracy 0.60). This handler recomputes the statistics as a plain average over
a few training batches at the current weights, with dropout off (Wu & Johnson, "Rethinking 'Batch' in
BatchNorm", 2021, section 3: "PreciseBN"). MONAI and ignite have no such handler.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from ignite.engine import Engine, Events

__all__ = ["RecomputeBatchNormStats", "recompute_batchnorm_stats"]


def recompute_batchnorm_stats(
    network: nn.Module,
    batches: Iterable,
    num_batches: int,
    device: torch.device | str | None = None,
    image_key: str = "image",
) -> int:
    """Reset and re-estimate the running mean / variance of every batch-norm layer that trains.

    Layers kept in eval mode by the network (e.g. frozen ones) are left alone. Returns the number of
    batches used (0 when the network has no trainable batch norm).
    """
    was_training = network.training
    network.train()
    bns = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns:
        network.train(was_training)
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = plain mean over the batches below
    drops = [m for m in network.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
    for m in drops:
        m.eval()
    used = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if used >= num_batches:
                    break
                x = batch[image_key] if isinstance(batch, dict) else batch[0]
                x = x.as_tensor() if hasattr(x, "as_tensor") else x
                network(x.to(device) if device is not None else x)
                used += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m in drops:
            m.train()
        network.train(was_training)
    return used


class RecomputeBatchNormStats:
    """Ignite handler: :func:`recompute_batchnorm_stats` at every trainer epoch end.

    List it in the trainer's handlers *before* ``ValidationHandler`` so that validation and the checkpoint
    it saves use the re-estimated statistics.

    Args:
        network: the trained network.
        data_loader: training batches (dicts with ``image_key``).
        num_batches: batches averaged (the default 8 x batch 32 = 256 images).
        device: where the batches go (default: the network's device).
        image_key: key of the input images in a batch.
    """

    def __init__(
        self,
        network: nn.Module,
        data_loader: Iterable,
        num_batches: int = 8,
        device: torch.device | str | None = None,
        image_key: str = "image",
    ) -> None:
        self.network = network
        self.data_loader = data_loader
        self.num_batches = int(num_batches)
        self.device = device
        self.image_key = image_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        device = self.device
        if device is None:
            p = next(self.network.parameters(), None)
            device = p.device if p is not None else None
        n = recompute_batchnorm_stats(
            self.network, self.data_loader, self.num_batches, device, self.image_key
        )
        engine.logger.info("re-estimated batch-norm statistics on %d training batches", n)
