"""Running a pipeline over many inputs, shared by the modalities: input discovery (:mod:`~.scans`), batch
runs with failures recorded (:mod:`~.batch`), resume by content hash (:mod:`~.resume`), torchrun sharding
(:mod:`~.distributed`), device choice (:mod:`~.device`) and returning freed memory (:mod:`~.memory`).
Outputs are written atomically by :mod:`ctcovid.io.atomic`."""

from .batch import BatchPipeline, BatchReport, run_batch
from .device import resolve_device

__all__ = ["BatchPipeline", "BatchReport", "resolve_device", "run_batch"]
