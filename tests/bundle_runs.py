"""Running a bundle's configs from tests: the short real training and evaluation the bundle tests share."""

from __future__ import annotations

from pathlib import Path

from monai.bundle import ConfigWorkflow


def run_workflow(config_file: str | list[str], workflow_type: str | None, **overrides) -> ConfigWorkflow:
    """Initialise, run and finalise a MONAI ``ConfigWorkflow`` with config overrides; returns it."""
    wf = ConfigWorkflow(config_file=config_file, workflow_type=workflow_type, **overrides)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


def short_training(configs: Path, work: Path, dataset_dir: Path, small: dict) -> dict:
    """One real training of ``configs/train.json`` on ``dataset_dir`` (1 epoch, batches of 2) with the test's
    reduced sizes ``small``; checkpoints in ``work/models``, logs in ``work/logs``."""
    overrides = dict(
        small,
        dataset_dir=str(dataset_dir),
        ckpt_dir=str(work / "models"),
        output_dir=str(work / "logs"),
        max_epochs=1,
        batch_size=2,
    )
    run_workflow(str(configs / "train.json"), "train", **overrides)
    return {"work": work, "ckpt_dir": work / "models", "logs": work / "logs", "overrides": overrides}


def evaluate(configs: Path, trained: dict, out: Path) -> Path:
    """``train.json`` + ``evaluate.json`` on a :func:`short_training`'s checkpoint; returns the output folder."""
    configs_list = [str(configs / "train.json"), str(configs / "evaluate.json")]
    run_workflow(configs_list, None, **dict(trained["overrides"], output_dir=str(out)))
    return out


def infer_with_checkpoint(configs: Path, checkpoint: Path, out: Path, **overrides) -> ConfigWorkflow:
    """``configs/inference.json`` with ``checkpoint`` into ``out``; asserts the network that ran carries
    exactly the checkpoint's weights."""
    import torch

    wf = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        workflow_type="infer",
        ckpt_path=str(checkpoint),
        output_dir=str(out),
        **overrides,
    )
    wf.initialize()
    wf.run()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    used = wf.parser.get_parsed_content("network").state_dict()
    assert all(torch.equal(saved[k], used[k].cpu()) for k in saved)
    return wf
