"""Data-parallel meta-training on MLX's own distributed engine (``mx.distributed``).

Start a run under ``mlx.launch`` (``mlx.launch -n 2 --backend ring -- metapeft meta-train ...``,
or ``metapeft meta-train --processes 2``, which starts the same ranks on localhost itself:
``cli.launch``). Every process calls ``mx.distributed.init()`` as mlx-lm's trainer does; with one
process it returns a group of size 1 and nothing here communicates, so a plain run is unchanged.

How the work is split (``meta.run.meta_train``):

- Meta-step t draws the same ``meta_batch`` task indices on every rank; rank r adapts the tasks
  ``i`` with ``i % size == r``. A meta-batch that ``size`` does not divide is allowed: the first
  ``meta_batch % size`` ranks get one task more, the others wait for them in the all-reduce (and
  a rank with no task contributes zeros). The update is the same either way.
- Each rank sums its tasks' contributions (Reptile's φ − θ, FOMAML's or MAML's gradient; the
  meta-learner never names the algorithm here), its query losses, accuracies and task count; one
  ``mx.distributed.all_sum`` adds them over the ranks and the sum is divided by the total task
  count, so every rank applies the same mean to the same θ (and the same outer optimizer state):
  θ is identical on every rank after every meta-step.
- Validation episodes and the test-time lr calibration's tasks are split the same way; each rank
  writes its results into its slots of a zero vector and the all_sum gathers them, so every rank
  sees exactly the numbers a single process computes (and picks the same best step).
- Only rank 0 writes: checkpoints, the published version, the experience record. The other
  ranks wait at a barrier (an all_sum of a scalar) that also hands them the version number.

A process that dies ends the run: its peers' next all_sum fails ("connection to a peer was lost")
and becomes a one-line ``DistributedError``, or the launcher (``mlx.launch``, or
``--processes``) terminates them when the dead process exits non-zero. Checkpoints are written atomically by rank 0, so the last one stays whole
and ``--resume`` continues it, with the same or a different number of processes (the task stream
depends on the seed and the step only). Every rank reads the checkpoint from its own registry
path: across machines the registry must be shared, or the checkpoint copied.

``tune --workers N`` runs on the same engine (``tune.study``: ``Study.run_batched`` and
``serve_trials``): rank 0 hands each batch of suggestions to every rank (``broadcast_json``) and
collects the trials' outcomes (``gather_json``), both plain all_sums of bytes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from metapeft.errors import UserError


class DistributedError(UserError):
    """A peer process of a distributed run was lost (or another communication failure)."""


class _Alone:
    """A group of one (what ``world()`` returns inside ``alone()``); nothing calls MLX with it,
    since every helper here returns early for size 1."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


_alone = 0


@contextlib.contextmanager
def alone():
    """Inside this block ``world()`` is this process alone (size 1, rank 0), though the process
    is a rank of a bigger group: for work each rank does on its own, such as a benchmark whose
    ranks each run whole ``tune`` studies or adaptations of their share of the tasks
    (``benchmarks/_ranks.py``), which must not split themselves over the benchmark's ranks.
    (MLX's ring backend cannot ``split`` a group into groups of one.)"""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def world():
    """The global group (``mx.distributed.init()``): size 1 unless started by ``mlx.launch``
    (or inside ``alone()``)."""
    if _alone:
        return _Alone()
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.path.isfile(hostfile) and not Path(hostfile).read_text().strip():
        # ``mlx.launch -n 1`` hands its one process an empty ring hostfile, which init() cannot
        # parse (MLX 0.32): one process is a group of one
        del os.environ["MLX_HOSTFILE"]
    return mx.distributed.init()


def size_of(group) -> int:
    return 1 if group is None else group.size()


def rank_of(group) -> int:
    return 0 if group is None else group.rank()


def is_root(group) -> bool:
    return rank_of(group) == 0


def mine(count: int, group) -> list[int]:
    """The indices ``i < count`` this rank handles: ``i % size == rank``."""
    size, rank = size_of(group), rank_of(group)
    return [i for i in range(count) if i % size == rank]


LOCAL_ENV = "METAPEFT_RING_FOLDER"  # set by cli.launch.run_local_ring: ranks share this folder
_reduces = 0


def _arrive(group) -> int | None:
    """On one machine (ranks started by ``cli.launch.run_local_ring``, which hands them a shared
    folder), wait asleep until every rank has reached this all-reduce, then enter it: MLX's ring
    backend busy-polls while it waits for a slower peer (a full core for as long as the wait:
    README, Scale out), which on a machine with as many cores as ranks takes CPU from the rank
    still computing whenever anything else runs. Each rank leaves a file per all-reduce and polls
    for its peers' every 2 ms. Returns the all-reduce's number (None without the folder).

    A peer that dies before it arrives would leave the others waiting here for ever (the ring's
    own error only comes inside the all-reduce), so about once a second the wait checks that
    every peer's process (its ``pid.R`` file) and the launcher are still there, and raises
    ``DistributedError`` when one is gone."""
    import time

    folder = os.environ.get(LOCAL_ENV)
    if not folder:
        return None
    global _reduces
    _reduces += 1
    rank, size = group.rank(), group.size()
    own_pid = Path(folder, f"pid.{rank}")
    if not own_pid.exists():
        own_pid.write_text(str(os.getpid()))
    Path(folder, f"reduce{_reduces}.{rank}").touch()
    peers = [Path(folder, f"reduce{_reduces}.{r}") for r in range(size)]
    launcher, polls = os.getppid(), 0
    while not all(p.exists() for p in peers):
        time.sleep(0.002)
        polls += 1
        if polls % 500 == 0:
            gone = _gone_peer(folder, size, launcher)
            if gone:
                raise DistributedError(f"rank {rank} of {size}: the distributed run lost a "
                                       f"process ({gone}) before all-reduce {_reduces}")
    return _reduces


def _gone_peer(folder: str, size: int, launcher: int) -> str | None:
    """What is gone, if anything: the launcher (this rank was re-parented) or a peer whose
    ``pid.R`` file names a process that no longer exists."""
    if os.getppid() != launcher:
        return "the launcher"
    for r in range(size):
        try:
            pid = int(Path(folder, f"pid.{r}").read_text())
        except (OSError, ValueError):
            continue  # not written yet (or mid-write): nothing to check
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"rank {r}, pid {pid}"
        except PermissionError:
            pass
    return None


def _leave(count: int | None, group) -> None:
    """After all-reduce ``count`` returned every peer has seen this rank's file: remove it."""
    if count is not None:
        Path(os.environ[LOCAL_ENV], f"reduce{count}.{group.rank()}").unlink(missing_ok=True)


def all_sum(arrays: list, group) -> list:
    """Sum each array over the group in one all-reduce, packed into one buffer as
    ``mlx.nn.average_gradients`` does (a LoRA tree has dozens of small leaves). Evaluated here, so
    a lost peer surfaces as a ``DistributedError`` at this call. With one process: unchanged.
    Ranks on one machine started by ``--processes``/``--workers`` first wait for each other
    asleep (``_arrive``)."""
    arrays = [a if isinstance(a, mx.array) else mx.array(a, dtype=mx.float32) for a in arrays]
    if size_of(group) == 1 or not arrays:
        return arrays
    dtypes = [a.dtype for a in arrays]
    common = dtypes[0] if all(d == dtypes[0] for d in dtypes) else mx.float32
    shapes, sizes = [a.shape for a in arrays], [a.size for a in arrays]
    with mx.stream(mx.cpu):  # the ring backend reduces on the CPU (as mlx-lm's trainer asks)
        flat = mx.concatenate([a.reshape(-1).astype(common) for a in arrays])
        mx.eval(flat)  # this rank's own work, before waiting for the others
        count = _arrive(group)
        try:
            total = mx.distributed.all_sum(flat, group=group)
            mx.eval(total)
        except RuntimeError as e:
            raise DistributedError(f"rank {group.rank()} of {group.size()}: the distributed run "
                                   f"lost a process ({str(e).splitlines()[0]})") from None
        _leave(count, group)
        out, start = [], 0
        for shape, n, dt in zip(shapes, sizes, dtypes):
            out.append(total[start:start + n].reshape(shape).astype(dt))
            start += n
    return out


def all_sum_tree(tree, group, *scalars):
    """(tree summed over the group, *scalars summed), all in one all-reduce."""
    flat = tree_flatten(tree)
    summed = all_sum([*scalars, *(v for _, v in flat)], group)
    k = len(scalars)
    return (tree_unflatten([(key, v) for (key, _), v in zip(flat, summed[k:])]), *summed[:k])


def broadcast_tree(tree, group):
    """Rank 0's tree on every rank, in one all-reduce: the other ranks pass a tree of the same
    shapes (their values are ignored: zeros go in, so the sum is rank 0's values exactly)."""
    if size_of(group) == 1:
        return tree
    if not is_root(group):
        tree = tree_map(mx.zeros_like, tree)
    return all_sum_tree(tree, group)[0]


def gather_slots(values: dict[int, float], count: int, group) -> list[float]:
    """Every rank's ``{index: value}`` (indices < ``count``) as one list on every rank: each rank
    fills its slots of a float64 zero vector and the all_sum adds them, which is exact where the
    ranks' indices are disjoint (a slot several ranks fill gets the sum of their values)."""
    vec = [0.0] * count
    for i, v in values.items():
        vec[i] = v
    if size_of(group) == 1:
        return vec
    (total,) = all_sum([mx.array(vec, dtype=mx.float64)], group)  # float64: exact gather
    return total.tolist()


def barrier(group, value: float = 0.0) -> float:
    """Wait for every rank; returns the sum of ``value`` over them (rank 0 hands out a number
    by passing it while the others pass 0)."""
    if size_of(group) == 1:
        return value
    (total,) = all_sum([mx.array(float(value), dtype=mx.float64)], group)
    return total.item()


def gather_json(obj, group) -> list:
    """Every rank's JSON-able ``obj``, as one list in rank order, on every rank: the lengths are
    gathered first (``gather_slots``), then each rank writes its UTF-8 bytes into its stretch of
    a zero byte buffer and one all_sum joins them (exact: the stretches are disjoint)."""
    import json

    import numpy as np

    data = json.dumps(obj).encode()
    size, rank = size_of(group), rank_of(group)
    if size == 1:
        return [json.loads(data)]
    lengths = [int(n) for n in gather_slots({rank: float(len(data))}, size, group)]
    starts = [sum(lengths[:r]) for r in range(size)]
    buf = np.zeros(max(sum(lengths), 1), dtype=np.uint8)
    buf[starts[rank]:starts[rank] + len(data)] = np.frombuffer(data, dtype=np.uint8)
    (total,) = all_sum([mx.array(buf)], group)
    raw = np.array(total).tobytes()
    return [json.loads(raw[s:s + n]) for s, n in zip(starts, lengths)]


def broadcast_json(obj, group):
    """Rank 0's JSON-able ``obj`` on every rank (what the other ranks pass is ignored)."""
    if size_of(group) == 1:
        return obj
    return gather_json(obj if is_root(group) else None, group)[0]
