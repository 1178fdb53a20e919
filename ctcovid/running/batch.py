"""Running a pipeline over many scans with outputs on disk, failures recorded, and resume.

For every scan of a run (see :func:`ctcovid.running.scans.discover_scans`) :func:`run_batch` writes into
``out_dir`` what the pipeline's result saves (for the CT pipeline ``<id>_lung_mask.nii.gz``,
``<id>_montage.png``) and then ``<id>.json`` (last, all atomically), and
after every scan it rewrites ``summary.csv`` (one row per scan handled so far, atomically), so a killed
run leaves complete files and an up-to-date summary.

- A scan that fails (unreadable, no lung slices, ...) gets ``status=failed`` with the reason in its JSON
  and its summary row; the run goes on.
- A scan whose ``<id>.json`` is ``ok`` with the same resume key (input content hash + model versions +
  options, :mod:`ctcovid.running.resume`) and whose mask and montage still exist is not recomputed: its
  row is rebuilt from that record (its status and values, as when it finished) with ``reused = True``.
  ``force=True`` recomputes everything. Failed scans are always retried.
- Reading runs ahead in a thread pool (``workers`` scans at a time) while the networks work on the
  current scan; networks run in the calling thread.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ctcovid.io.atomic import write_csv_atomic, write_json_atomic
from ctcovid.io.errors import CTInputError, InputNotFoundError

from .resume import hash_input, load_done_record, resume_key
from .scans import ScanInput, discover_scans

__all__ = ["BatchPipeline", "BatchReport", "REUSED_COLUMN", "SUMMARY_NAME", "run_batch", "summary_columns"]

SUMMARY_NAME = "summary.csv"

#: ``summary.csv`` column saying whether the row's result was computed by an earlier run (resume).
REUSED_COLUMN = "reused"


def summary_columns(fields: Sequence[str], rows: Iterable[dict[str, Any]]) -> list[str]:
    """``summary.csv`` columns: the pipeline's fixed ``fields`` with :data:`REUSED_COLUMN` after ``status``,
    then every other key that holds a value in some row (e.g. ``p_<class>``), in order of first appearance."""
    columns = list(fields)
    columns.insert(columns.index("status") + 1 if "status" in columns else len(columns), REUSED_COLUMN)
    for row in rows:
        columns += [k for k, v in row.items() if k not in columns and v not in (None, "")]
    return columns


class BatchPipeline(Protocol):
    """What :func:`run_batch` needs of a pipeline (:class:`ctcovid.ct.CTCovidPipeline` is one).

    ``result_type`` is the class of its results: ``SUMMARY_FIELDS`` (fixed ``summary.csv`` columns),
    ``output_names(scan_id)``, ``failed(scan_id, path, reason, **fields)`` and
    ``summary_row_from_record(record, scan_id, path, status, reason)``; a result has ``save(out_dir)``,
    ``to_dict()``, ``summary_row()``, ``timings_s``, ``input_sha256`` and ``resume_key``.
    """

    result_type: type

    def read(self, path: str | os.PathLike) -> Any: ...

    def process(self, volume: Any, path=None, scan_id=None, read_seconds=None, on_stage=None) -> Any: ...

    def model_versions(self) -> dict[str, dict]: ...

    def options(self) -> dict[str, Any]: ...


@dataclass
class BatchReport:
    """What a run did: one summary row per scan, in input order."""

    out_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary_name: str = SUMMARY_NAME

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r["status"] == status)

    @property
    def ok(self) -> int:
        """Inputs with a result (computed now or reused)."""
        return self.count("ok")

    @property
    def failed(self) -> int:
        return self.count("failed")

    @property
    def reused(self) -> int:
        """Inputs whose result an earlier run computed (resume)."""
        return sum(1 for r in self.rows if r.get(REUSED_COLUMN) is True)

    @property
    def summary_path(self) -> Path:
        return self.out_dir / self.summary_name


@dataclass
class _Prepared:
    """A scan after the read-ahead step: either done already, read, or failed to read."""

    scan: ScanInput
    input_sha256: str | None = None
    key: str | None = None
    record: dict | None = None  # the finished record when the scan is already done
    volume: Any = None
    read_seconds: float = 0.0
    error: BaseException | None = None

    def take_volume(self) -> Any:
        """Hand the volume over: once no name here holds it, the pipeline frees it as soon as it is
        normalised (:meth:`ctcovid.ct.CTCovidPipeline.process`) instead of at the end of the scan."""
        volume, self.volume = self.volume, None
        return volume


def _outputs_of(pipeline: BatchPipeline, scan_id: str, out_dir: Path) -> list[Path]:
    return [out_dir / name for name in pipeline.result_type.output_names(scan_id)]


def _reason(e: BaseException) -> str:
    if isinstance(e, CTInputError):
        return str(e)
    return f"{type(e).__name__}: {e}"  # unexpected: keep the type so the row is searchable


def run_batch(
    inputs: Iterable[str | os.PathLike] | Sequence[ScanInput],
    out_dir: str | os.PathLike,
    pipeline: BatchPipeline,
    force: bool = False,
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    summary_name: str = SUMMARY_NAME,
    on_row: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> BatchReport:
    """Run ``pipeline`` on every scan of ``inputs`` and write the outputs into ``out_dir``.

    Args:
        inputs: paths (files, scan folders, parent folders) or already discovered :class:`ScanInput`.
        out_dir: output folder (created).
        pipeline: a loaded pipeline (:class:`BatchPipeline`), e.g. :class:`ctcovid.ct.CTCovidPipeline`.
        force: recompute scans that are already done.
        workers: scans read ahead in background threads (0 reads in the calling thread).
        progress: show tqdm bars (scans, and stages of the current scan) on stderr.
        log: where per-scan failure messages go (default: ``tqdm.write`` to stderr).
        summary_name: file name of the summary in ``out_dir`` (a distributed rank writes its own partial
            summary, :mod:`ctcovid.running.distributed`).
        on_row: called as ``on_row(i, n, row)`` after input ``i`` of ``n`` (1-based) has its summary row.

    Returns:
        A :class:`BatchReport` whose rows are also in ``out_dir/summary.csv`` (``out_dir/summary_name``).

    Raises:
        FileNotFoundError: an input path does not exist (nothing is run).
    """
    from tqdm.auto import tqdm

    items = list(inputs)
    scans = items if items and all(isinstance(i, ScanInput) for i in items) else discover_scans(items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = BatchReport(out_dir=out, summary_name=summary_name)
    say = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    # what decides results: bundle, version and weight hash per stage (not paths or status wording)
    versions = {
        stage: {k: v.get(k) for k in ("bundle", "version", "weights_sha256")}
        for stage, v in pipeline.model_versions().items()
    }
    options = pipeline.options()

    def prepare(scan: ScanInput) -> _Prepared:
        p = _Prepared(scan)
        try:
            if not Path(scan.path).exists():
                raise InputNotFoundError(scan.path, "no such file or folder")
            p.input_sha256 = hash_input(scan.path)
            p.key = resume_key(p.input_sha256, versions, options)
            if not force:
                p.record = load_done_record(
                    out / f"{scan.scan_id}.json", p.key, _outputs_of(pipeline, scan.scan_id, out)
                )
                if p.record is not None:
                    return p
            t = time.perf_counter()
            p.volume = pipeline.read(scan.path)
            p.read_seconds = time.perf_counter() - t
        except Exception as e:  # recorded as a failed scan; the run goes on
            p.error = e
        return p

    def write_summary() -> None:
        columns = summary_columns(pipeline.result_type.SUMMARY_FIELDS, report.rows)
        write_csv_atomic(report.rows, columns, report.summary_path)

    bar = tqdm(total=len(scans), desc="scans", unit="scan", disable=not progress, file=sys.stderr)
    stage_bar = tqdm(
        total=0, desc="stages", leave=False, disable=not progress, file=sys.stderr, bar_format="{desc}"
    )
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctcovid-read") if workers > 0 else None
    queue: deque[Future | _Prepared] = deque()
    pending = iter(scans)

    def refill() -> None:
        # at most `workers` scans read ahead: bounded memory however many scans there are
        while len(queue) < max(workers, 1):
            scan = next(pending, None)
            if scan is None:
                return
            queue.append(pool.submit(prepare, scan) if pool else prepare(scan))

    try:
        refill()
        while queue:
            head = queue.popleft()
            prep = head.result() if isinstance(head, Future) else head
            refill()
            scan = prep.scan
            bar.set_postfix_str(scan.scan_id)
            if prep.record is not None:
                row = pipeline.result_type.summary_row_from_record(
                    prep.record,
                    scan.scan_id,
                    str(scan.path),
                    status=prep.record.get("status", "ok"),
                    reason=prep.record.get("reason"),
                )
                report.rows.append({**row, REUSED_COLUMN: True})
            else:
                row = _process_one(pipeline, prep, out, stage_bar, say)
                report.rows.append({**row, REUSED_COLUMN: False})
            write_summary()
            bar.update(1)
            if on_row is not None:
                on_row(len(report.rows), len(scans), report.rows[-1])
        write_summary()  # an empty run still gets its (header-only) summary
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        stage_bar.close()
        bar.close()
    return report


def _process_one(pipeline: BatchPipeline, prep: _Prepared, out: Path, stage_bar, say) -> dict[str, Any]:
    scan = prep.scan
    try:
        if prep.error is not None:
            raise prep.error
        result = pipeline.process(
            prep.take_volume(),
            path=scan.path,
            scan_id=scan.scan_id,
            read_seconds=prep.read_seconds,
            on_stage=lambda s: stage_bar.set_description_str(f"  {scan.scan_id}: {s}"),
        )
        result.input_sha256 = prep.input_sha256
        result.resume_key = prep.key
        t = time.perf_counter()
        result.timings_s["outputs"] = 0.0
        stage_bar.set_description_str(f"  {scan.scan_id}: writing outputs")
        result.save(out)  # JSON written last: the commit mark for resume
        result.timings_s["outputs"] = time.perf_counter() - t
        write_json_atomic(result.to_dict(), out / f"{scan.scan_id}.json")  # with the output timing
        return result.summary_row()
    except Exception as e:
        reason = _reason(e)
        failed = pipeline.result_type.failed(
            scan.scan_id, str(scan.path), reason, input_sha256=prep.input_sha256, models=pipeline.model_versions()
        )
        if not isinstance(e, CTInputError):
            say(f"{scan.scan_id}: unexpected error\n{''.join(traceback.format_exception(e))}")
        say(f"failed: {reason}")
        try:
            for stale in _outputs_of(pipeline, scan.scan_id, out):  # from an earlier success on other content
                stale.unlink(missing_ok=True)
            failed.save(out)
        except OSError as write_error:  # the summary row still records the failure
            say(f"{scan.scan_id}: could not write its record: {write_error}")
        return failed.summary_row()
    finally:
        prep.volume = None  # free the volume before the next scan
