"""Patient-level k-fold cross-validation of a classifier with MONAI engines (the DETL bundle's evaluate workflow).

For each fold ``i`` of a datalist holding parts ``fold0 .. fold{k-1}`` (made by
:func:`ctcovid.training.splits.patient_kfold`: a patient's images are all in one fold), a fresh network
is trained by a MONAI ``SupervisedTrainer`` on the other ``k - 1`` folds for a fixed number of epochs, then a
``SupervisedEvaluator`` predicts the held-out fold and :class:`ctcovid.training.handlers.ClassificationReportWriter`
writes its report. The summary holds each fold's accuracy, their mean and standard deviation (sample,
``ddof=1``), the confusion matrices summed over folds, and a classification report of the pooled
held-out predictions (every image is held out exactly once). MONAI has no cross-validation workflow for
bundles (``monai.apps.CrossValidation`` only splits a dataset), hence this class.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ctcovid.io.atomic import write_json_atomic

from .splits import class_weights, fold_parts, load_parts

__all__ = ["KFoldCrossValidation", "summarize_folds"]

logger = logging.getLogger(__name__)


def summarize_folds(fold_reports: Sequence[dict], class_names: Sequence[str]) -> dict:
    """Mean / std of fold accuracies, summed confusion matrix and the pooled report of held-out predictions.

    ``fold_reports``: :class:`~ctcovid.training.handlers.ClassificationReportWriter` reports (with ``scans``).
    """
    from ctcovid.metrics.classification import classification_report

    if not fold_reports:
        raise ValueError("no fold reports to summarise")
    acc = np.asarray([r["accuracy"] for r in fold_reports], dtype=np.float64)
    cm = np.sum([np.asarray(r["confusion_matrix"], dtype=np.int64) for r in fold_reports], axis=0)
    names = list(class_names)
    labels = [names.index(s["label"]) for r in fold_reports for s in r["scans"]]
    probs = [s["probabilities"] for r in fold_reports for s in r["scans"]]
    pooled = classification_report(labels, probs, names)
    pooled.pop("confusion_matrix")  # identical to the summed one
    return {
        "folds": len(fold_reports),
        "class_names": names,
        "fold_accuracy": [round(float(a), 6) for a in acc],
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "confusion_matrix_summed": cm.tolist(),
        "pooled": pooled,
    }


class KFoldCrossValidation:
    """Train and evaluate a classifier on each patient-level fold of a datalist.

    Args:
        datalist_file: datalist JSON with parts ``fold0`` .. ``fold{num_folds-1}``.
        data_root: folder the datalist paths are relative to.
        num_folds: ``k``.
        network_fn: ``() -> nn.Module``, a fresh (e.g. stage-A initialised, partly frozen) network per fold;
            in a bundle config a ``"_mode_": "callable"`` component.
        optimizer_fn: ``(params) -> Optimizer``, given the parameters that require grad.
        train_transform / eval_transform: dictionary transforms producing ``image`` ``(C, H, W)`` and ``label``.
        class_names: class order of the network's outputs and of the datalist labels.
        epochs: training epochs per fold (no model selection inside a fold: the last epoch is evaluated).
        output_dir: ``fold<i>/report.json`` per fold, ``kfold_report.json`` and ``kfold_confusion_matrix.png``.
        device: torch device.
        batch_size / num_workers: data loading.
        train_limit / eval_limit: class-balanced subsets per fold (reduced CPU runs); ``None`` = all.
        use_class_weights: inverse-frequency class weights (from the fold's training images) in the loss.
        bn_recompute_batches: after training, re-estimate batch-norm statistics on this many training batches
            before evaluating (:mod:`ctcovid.training.handlers.batchnorm`); 0 = keep the running averages.
        run_folds: which folds to run (default all); the summary covers the folds run.
        seed: determinism seed (set before each fold).
    """

    def __init__(
        self,
        datalist_file: str | os.PathLike,
        data_root: str | os.PathLike,
        network_fn: Callable[[], nn.Module],
        optimizer_fn: Callable[..., torch.optim.Optimizer],
        train_transform: Callable,
        eval_transform: Callable,
        class_names: Sequence[str],
        output_dir: str | os.PathLike,
        num_folds: int = 5,
        epochs: int = 10,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        num_workers: int = 0,
        train_limit: int | None = None,
        eval_limit: int | None = None,
        use_class_weights: bool = True,
        bn_recompute_batches: int = 0,
        run_folds: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.datalist_file = datalist_file
        self.data_root = data_root
        self.network_fn = network_fn
        self.optimizer_fn = optimizer_fn
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.class_names = [str(c) for c in class_names]
        self.output_dir = Path(output_dir)
        self.num_folds = int(num_folds)
        self.epochs = int(epochs)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.train_limit = train_limit
        self.eval_limit = eval_limit
        self.use_class_weights = use_class_weights
        self.bn_recompute_batches = int(bn_recompute_batches or 0)
        self.run_folds = list(range(self.num_folds)) if run_folds is None else [int(i) for i in run_folds]
        self.seed = int(seed)
        self.summary: dict | None = None

    def run_fold(self, i: int) -> dict:
        """Train on every fold but ``i``, evaluate on fold ``i``; returns that fold's report."""
        from monai.data import DataLoader, Dataset
        from monai.engines import SupervisedEvaluator, SupervisedTrainer
        from monai.handlers import StatsHandler, from_engine
        from monai.transforms import Activationsd
        from monai.utils import set_determinism

        from ctcovid.training.handlers.report import ClassificationReportWriter

        set_determinism(seed=self.seed + i)
        train_parts, held_out = fold_parts(self.num_folds, i)
        train_items = load_parts(self.datalist_file, train_parts, self.data_root, self.train_limit, self.seed)
        eval_items = load_parts(self.datalist_file, held_out, self.data_root, self.eval_limit, self.seed)
        k = len(self.class_names)
        weight = torch.tensor(class_weights(train_items, k), dtype=torch.float32) if self.use_class_weights else None
        network = self.network_fn().to(self.device)
        optimizer = self.optimizer_fn([p for p in network.parameters() if p.requires_grad])
        train_loader = DataLoader(
            Dataset(train_items, self.train_transform),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=len(train_items) > self.batch_size,
        )
        trainer = SupervisedTrainer(
            device=self.device,
            max_epochs=self.epochs,
            train_data_loader=train_loader,
            network=network,
            optimizer=optimizer,
            loss_function=nn.CrossEntropyLoss(weight=None if weight is None else weight.to(self.device)),
            train_handlers=[
                StatsHandler(tag_name=f"fold{i}_train_loss", output_transform=from_engine(["loss"], first=True),
                             iteration_log=False)
            ],
        )
        t0 = time.time()
        trainer.run()
        if self.bn_recompute_batches:
            from ctcovid.training.handlers.batchnorm import recompute_batchnorm_stats

            recompute_batchnorm_stats(network, train_loader, self.bn_recompute_batches, self.device)
        writer = ClassificationReportWriter(
            self.output_dir / f"fold{i}",
            self.class_names,
            filename="report.json",
            extra={
                "fold": i,
                "training_parts": train_parts,
                "held_out_part": held_out,
                "training_images": len(train_items),
                "epochs": self.epochs,
            },
        )
        evaluator = SupervisedEvaluator(
            device=self.device,
            val_data_loader=DataLoader(
                Dataset(eval_items, self.eval_transform), batch_size=self.batch_size, num_workers=self.num_workers
            ),
            network=network,
            postprocessing=Activationsd(keys="pred", softmax=True),
            val_handlers=[writer],
        )
        evaluator.run()
        report = writer.report
        report["seconds"] = round(time.time() - t0, 1)
        write_json_atomic(report, writer.path)
        logger.info("fold %d: accuracy %.4f on %d held-out images (%.0f s)", i, report["accuracy"],
                    report["num_samples"], report["seconds"])
        return report

    def run(self) -> dict:
        """Run the folds, write ``kfold_report.json`` and the summed confusion matrix PNG; returns the summary."""
        from ctcovid.visualize.plots import save_confusion_matrix_png

        reports = [self.run_fold(i) for i in self.run_folds]
        summary = summarize_folds(reports, self.class_names)
        summary.update(
            datalist=str(self.datalist_file),
            folds_run=self.run_folds,
            epochs_per_fold=self.epochs,
            train_limit=self.train_limit,
            eval_limit=self.eval_limit,
            seconds=round(sum(r["seconds"] for r in reports), 1),
        )
        write_json_atomic(summary, self.output_dir / "kfold_report.json")
        save_confusion_matrix_png(
            summary["confusion_matrix_summed"],
            self.class_names,
            self.output_dir / "kfold_confusion_matrix.png",
            f"{len(reports)}-fold CV, summed (accuracy {summary['accuracy_mean']:.3f} +/- {summary['accuracy_std']:.3f})",
        )
        logger.info("k-fold accuracy %.4f +/- %.4f over folds %s", summary["accuracy_mean"], summary["accuracy_std"],
                    self.run_folds)
        self.summary = summary
        return summary
