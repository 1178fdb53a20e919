"""Batch inference over many scans split across processes launched by ``torchrun`` (GPUs or CPU).

``torchrun --nproc_per_node N -m ctcovid predict SCANS --out OUT`` starts N processes (ranks); each runs
:func:`ctcovid.running.batch.run_batch` on its own share of the scans, so N GPUs (or N groups of CPU
cores) work on N scans at once. The models are independent per rank: nothing but the plan, one barrier and
the exit code goes over the process group. :func:`run_sharded` does, on every rank:

1. initialise the process group from torchrun's environment: NCCL when the rank has its own GPU
   (``cuda:LOCAL_RANK``; ``--device auto`` and ``cuda`` map to it), Gloo otherwise (CPU);
2. rank 0 discovers the scans and splits them (:func:`shard_by_cost`); the plan is broadcast, so every
   rank works from the same list even if an input folder changes meanwhile;
3. each rank runs its shard, writing per-scan outputs into the shared ``OUT`` (scan ids are unique, so no
   two ranks write the same file) and its own partial summary ``summary.rank<r>.csv`` (atomically);
4. barrier; rank 0 merges the partials into ``summary.csv`` in input order (atomically) and removes them;
5. the exit code is the maximum over ranks (the CLI's codes grow with severity: 0 ok < 1 scans failed <
   2 usage < 3 models < 130 interrupted), so every rank, and torchrun, reports a failure on any rank;
6. the process group is destroyed, also on errors.

Resume works as in a single process: a scan is skipped when its ``<id>.json`` in ``OUT`` carries the same
resume key, whichever rank processed it before. ``OUT`` must be visible to every rank (a shared file
system when ranks span several machines).
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ctcovid.io.atomic import write_csv_atomic

from .batch import REUSED_COLUMN, SUMMARY_NAME, summary_columns
from .resume import input_files
from .scans import ScanInput

__all__ = [
    "DEFAULT_TIMEOUT",
    "TorchrunWorld",
    "backend_for",
    "merge_partial_summaries",
    "partial_summary_name",
    "rank_device",
    "run_sharded",
    "scan_cost",
    "shard_by_cost",
    "torchrun_world",
]

#: How long a rank waits for the others at the barrier. Shards finish at different times (a rank whose
#: scans are all done already finishes in seconds), so this is far above torch's 10-30 min default.
DEFAULT_TIMEOUT = timedelta(hours=24)

_PARTIAL = re.compile(r"^summary\.rank\d+\.csv$")


@dataclass(frozen=True)
class TorchrunWorld:
    """Where this process sits in a torchrun launch (from ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""

    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def torchrun_world(environ: Mapping[str, str] | None = None) -> TorchrunWorld | None:
    """The torchrun world of this process, or ``None`` for a single-process run.

    ``None`` unless ``WORLD_SIZE`` > 1 and ``RANK`` is set (``torchrun --nproc_per_node 1`` is a plain
    single-process run). ``LOCAL_RANK`` defaults to ``RANK``.
    """
    env = os.environ if environ is None else environ
    try:
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env["RANK"])
    except (KeyError, ValueError):
        return None
    if world_size <= 1:
        return None
    local_rank = int(env.get("LOCAL_RANK", rank))
    return TorchrunWorld(rank=rank, local_rank=local_rank, world_size=world_size)


def rank_device(device: str, world: TorchrunWorld) -> str:
    """The device this rank runs on: ``auto`` -> ``cuda:LOCAL_RANK`` if CUDA is available else ``cpu``;
    ``cuda`` -> ``cuda:LOCAL_RANK``; anything else (``cpu``, an explicit ``cuda:N``) as given.

    Raises ``ValueError`` when ``LOCAL_RANK`` has no GPU (more processes per node than GPUs).
    """
    name = str(device).strip().lower()
    if name == "auto" and not torch.cuda.is_available():
        return "cpu"
    if name not in ("auto", "cuda"):
        return str(device)
    if torch.cuda.is_available() and world.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"rank {world.rank} has LOCAL_RANK {world.local_rank} but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s): use --nproc_per_node <= {torch.cuda.device_count()} "
            "or --device cpu"
        )
    return f"cuda:{world.local_rank}"  # without CUDA the pipeline reports that CUDA is unavailable


def backend_for(device: str, local_rank: int) -> str:
    """``"nccl"`` when the rank has its own GPU (``device`` is ``cuda:LOCAL_RANK``), else ``"gloo"``.

    Only a few bytes go over the group (plan, barrier, exit code), so Gloo serves every other case, e.g.
    several ranks sharing one GPU through an explicit ``--device cuda:0`` (NCCL refuses duplicate GPUs).
    """
    try:
        dev = torch.device(device)
    except RuntimeError:  # not a device name: the pipeline reports it as a usage error
        return "gloo"
    own_gpu = dev.type == "cuda" and dev.index == local_rank
    return "nccl" if own_gpu and torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def partial_summary_name(rank: int) -> str:
    """File name of rank ``rank``'s partial summary in the output folder."""
    return f"summary.rank{rank}.csv"


def scan_cost(scan: ScanInput, out_dir: str | os.PathLike | None = None) -> int:
    """Expected work for ``scan``: the bytes of its input files (reading and network time grow with them).

    With ``out_dir``, a scan whose ``<id>.json`` there says ``ok`` costs 0: it will most likely be skipped
    by resume (the rank still checks the resume key, so a wrong guess only costs balance). Unreadable
    inputs cost 0 (they fail fast).
    """
    if out_dir is not None:
        try:
            with open(Path(out_dir) / f"{scan.scan_id}.json", encoding="utf-8") as f:
                if json.load(f).get("status") == "ok":
                    return 0
        except (OSError, ValueError, AttributeError):
            pass
    total = 0
    try:
        for f in input_files(scan.path):
            try:
                total += f.stat().st_size
            except OSError:
                pass
    except OSError:
        return 0
    return total


def shard_by_cost(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Split scans ``0..len(costs)-1`` over ``world_size`` ranks, balancing the summed cost.

    Rule (greedy longest-processing-time first): take scans by decreasing cost (ties: input order) and give
    each to the rank with the least cost so far (ties: fewer scans, then lower rank); every shard is then
    sorted back into input order. Each scan lands on exactly one rank, the result depends only on
    ``costs`` and ``world_size``, the most and least loaded ranks differ by at most one scan's cost, and
    equal costs are dealt out round-robin (shard sizes differ by at most one).

    Returns:
        ``world_size`` lists of scan indices, in input order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [(0, 0)] * world_size  # (cost, scans) per rank
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-max(int(costs[i]), 0), i)):
        r = min(range(world_size), key=lambda r: (*load[r], r))
        shards[r].append(i)
        load[r] = (load[r][0] + max(int(costs[i]), 0), load[r][1] + 1)
    return [sorted(s) for s in shards]


def merge_partial_summaries(
    out_dir: str | os.PathLike, scans: Sequence[ScanInput], world_size: int, fields: Sequence[str]
) -> list[dict[str, str]] | None:
    """Merge ``summary.rank<r>.csv`` (r < ``world_size``) into ``summary.csv``; remove every partial.

    Rows follow the order of ``scans``; a scan without a row (its rank stopped before running it) is left
    out. Columns are those of a single-process run: the fixed ones (``fields``), then ``p_<class>`` columns in the
    order they first hold a value. Returns the merged rows, or ``None`` (nothing written) when no rank
    wrote a partial summary (nothing ran, e.g. missing weights).
    """
    out = Path(out_dir)
    by_id: dict[str, dict[str, str]] = {}
    found = False
    for r in range(world_size):
        path = out / partial_summary_name(r)
        if not path.is_file():
            continue
        found = True
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                by_id[row["scan_id"]] = row
    if not found:
        return None
    rows = [by_id[s.scan_id] for s in scans if s.scan_id in by_id]
    # a single process adds p_<class> keys only to graded rows: the same rule gives the same column order
    write_csv_atomic(rows, summary_columns(fields, rows), out / SUMMARY_NAME)
    for path in out.iterdir():  # this run's partials and any left by a killed run with more ranks
        if _PARTIAL.match(path.name):
            path.unlink(missing_ok=True)
    return rows


def run_sharded(
    world: TorchrunWorld,
    out_dir: str | os.PathLike,
    device: str,
    plan: Callable[[], Sequence[ScanInput] | int],
    run_shard: Callable[[list[ScanInput], str, str], int],
    summary_fields: Sequence[str],
    cost_out_dir: str | os.PathLike | None = None,
    failed_code: int = 1,
    timeout: timedelta = DEFAULT_TIMEOUT,
    log: Callable[[str], None] | None = None,
) -> int:
    """Run a batch sharded over the ranks of ``world`` (see the module docstring); returns the exit code.

    Args:
        world: from :func:`torchrun_world`.
        out_dir: the shared output folder.
        device: the requested device (``auto``, ``cpu``, ``cuda``, ``cuda:N``), mapped by :func:`rank_device`.
        plan: called on rank 0 only: the scans of the run, or an exit code that every rank then returns
            (a usage error the callee has already reported).
        run_shard: ``run_shard(scans, device, summary_name) -> exit code``: processes this rank's scans
            (input order) on ``device`` with the partial summary ``out_dir/summary_name``.
        summary_fields: the fixed ``summary.csv`` columns (the pipeline's ``result_type.SUMMARY_FIELDS``).
        cost_out_dir: passed to :func:`scan_cost` (the output folder, or ``None`` with ``--force``).
        failed_code: exit code of a rank that raised, or of a failed merge.
        timeout: how long collectives (the barrier) wait.
        log: where rank 0's plan and totals go (default: stderr).

    Returns:
        The maximum of the ranks' exit codes: the same on every rank.
    """
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    device = rank_device(device, world)
    backend = backend_for(device, world.local_rank)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))  # this rank's collectives run on its own GPU
        kwargs["device_id"] = torch.device(device)
    dist.init_process_group(backend, timeout=timeout, rank=world.rank, world_size=world.world_size, **kwargs)
    try:
        box: list = [None]
        if world.is_main:
            box[0] = _plan(plan, world.world_size, backend, cost_out_dir, failed_code, say)
        dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], int):
            return box[0]
        scans, shards = box[0]
        partial = Path(out_dir) / partial_summary_name(world.rank)
        partial.unlink(missing_ok=True)  # a killed run's stale partial must not be merged
        try:
            code = int(run_shard([scans[i] for i in shards[world.rank]], device, partial.name))
        except Exception:  # still join the barrier: the others' results get merged, the code says failed
            print(f"rank {world.rank}: unexpected error\n{traceback.format_exc()}", file=sys.stderr)
            code = failed_code
        dist.barrier()  # every partial summary is complete
        if world.is_main:
            try:
                rows = merge_partial_summaries(out_dir, scans, world.world_size, summary_fields)
            except (OSError, ValueError, KeyError) as e:
                say(f"could not merge the partial summaries in {out_dir}: {e}")
                code = max(code, failed_code)
            else:
                if rows is not None:
                    say(_totals(rows, len(scans), world.world_size, Path(out_dir) / SUMMARY_NAME))
        agreed = torch.tensor([code], dtype=torch.int64, device=device if backend == "nccl" else "cpu")
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        return int(agreed.item())
    finally:
        dist.destroy_process_group()


def _plan(plan, world_size: int, backend: str, cost_out_dir, failed_code: int, say):
    """Rank 0: ``(scans, shards)``, or an exit code for every rank."""
    try:
        scans = plan()
        if isinstance(scans, int):
            return scans
        scans = list(scans)
        costs = [scan_cost(s, cost_out_dir) for s in scans]
        shards = shard_by_cost(costs, world_size)
    except Exception:  # every rank must get an answer, or the others wait for the broadcast
        say(f"rank 0: could not plan the run\n{traceback.format_exc()}")
        return failed_code
    per_rank = ", ".join(f"{len(s)} ({sum(costs[i] for i in s) / 1e6:.1f} MB)" for s in shards)
    say(
        f"distributed run: {len(scans)} scan(s) over {world_size} ranks ({backend}); scans (MB of input not done yet) per rank: {per_rank}"
    )
    return scans, shards


def _totals(rows: list[dict[str, str]], n_scans: int, world_size: int, summary: Path) -> str:
    count = {s: sum(1 for r in rows if r["status"] == s) for s in ("ok", "failed")}
    reused = sum(1 for r in rows if r.get(REUSED_COLUMN) == "True")
    missing = n_scans - len(rows)
    text = (
        f"all {world_size} ranks: {n_scans} scan(s): {count['ok']} ok ({reused} reused from an earlier run), "
        f"{count['failed']} failed"
    )
    if missing:
        text += f", {missing} not run (a rank stopped early)"
    return f"{text}. Summary: {summary.resolve()}"
