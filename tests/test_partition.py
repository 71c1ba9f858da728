"""Invariants of the index math: permutation, disjoint equal ranks, coverage, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logitcache.errors import LogitcacheError
from logitcache.loader.partition import (
    OrderSettings,
    clip_units,
    epoch_order,
    global_batches,
    read_plan,
    unit_bounds,
    worker_samples,
)

unit_sizes = st.lists(st.integers(1, 40), min_size=1, max_size=30)
Stream = tuple[list[int], OrderSettings]
untimed = settings(deadline=None)  # correctness only; a shared CI machine makes deadlines flaky


@st.composite
def streams(draw: st.DrawFn) -> Stream:
    """Unit sizes and order settings whose lanes divide the global batch."""
    sizes = draw(unit_sizes)
    lanes = draw(st.sampled_from([1, 2, 3, 4]))
    order = OrderSettings(
        seed=draw(st.integers(0, 2**32)),
        global_batch_size=lanes * draw(st.integers(1, 6)),
        lanes=lanes,
        shuffle=draw(st.booleans()),
        block_size=draw(st.integers(1, 100)),
    )
    return sizes, order


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def rank_stream(
    sizes: list[int], order: OrderSettings, *, rank: int, world: int, workers: int, start: int = 0
) -> np.ndarray:
    """``[steps, b]``: a rank's batches as torch's DataLoader collects them (batch i from worker i % W)."""
    b = order.global_batch_size // world
    per_worker = [
        worker_samples(
            sizes, order, epoch=3, sample_in_epoch=start, rank=rank, world_size=world, worker=w, num_workers=workers
        ).reshape(-1, b)
        for w in range(workers)
    ]
    steps = sum(len(batches) for batches in per_worker)
    return np.array([per_worker[i % workers][i // workers] for i in range(steps)]).reshape(steps, b)


@given(sizes=unit_sizes, seed=st.integers(0, 2**32), epoch=st.integers(0, 50), block=st.integers(1, 100))
@untimed
def test_epoch_order_is_a_deterministic_permutation(sizes: list[int], seed: int, epoch: int, block: int) -> None:
    order = epoch_order(sizes, seed=seed, epoch=epoch, block_size=block, shuffle=True)
    assert np.array_equal(np.sort(order), np.arange(sum(sizes)))
    assert np.array_equal(order, epoch_order(sizes, seed=seed, epoch=epoch, block_size=block, shuffle=True))


@given(unit=st.integers(1, 20), units=st.integers(1, 20), seed=st.integers(0, 1000))
@untimed
def test_blocks_of_one_unit_keep_each_unit_together(unit: int, units: int, seed: int) -> None:
    order = epoch_order([unit] * units, seed=seed, epoch=0, block_size=unit, shuffle=True)
    for block in order.reshape(units, unit):
        assert np.array_equal(np.sort(block), np.arange(block.min(), block.min() + unit))


def test_epochs_and_seeds_reorder() -> None:
    base = epoch_order([8] * 16, seed=0, epoch=0, block_size=32, shuffle=True)
    assert not np.array_equal(base, epoch_order([8] * 16, seed=0, epoch=1, block_size=32, shuffle=True))
    assert not np.array_equal(base, epoch_order([8] * 16, seed=1, epoch=0, block_size=32, shuffle=True))


@given(stream=streams(), data=st.data())
@untimed
def test_ranks_are_disjoint_equal_and_cover_all_but_the_remainder(stream: Stream, data: st.DataObject) -> None:
    sizes, order = stream
    world = data.draw(st.sampled_from(divisors(order.global_batch_size)))
    ranks = [rank_stream(sizes, order, rank=r, world=world, workers=1) for r in range(world)]
    assert len({r.shape for r in ranks}) == 1
    seen = np.concatenate([r.reshape(-1) for r in ranks])
    assert len(np.unique(seen)) == len(seen)
    assert len(seen) == sum(sizes) - sum(sizes) % order.global_batch_size


@given(stream=streams(), data=st.data())
@untimed
def test_worker_count_keeps_the_rank_stream(stream: Stream, data: st.DataObject) -> None:
    sizes, order = stream
    world = data.draw(st.sampled_from(divisors(order.global_batch_size)))
    rank = data.draw(st.integers(0, world - 1))
    one = rank_stream(sizes, order, rank=rank, world=world, workers=1)
    for workers in (2, 3, 5):
        assert np.array_equal(rank_stream(sizes, order, rank=rank, world=world, workers=workers), one)


@given(stream=streams(), data=st.data())
@untimed
def test_world_size_keeps_the_global_batches(stream: Stream, data: st.DataObject) -> None:
    sizes, order = stream
    world = data.draw(st.sampled_from(divisors(order.global_batch_size)))
    joined = np.concatenate([rank_stream(sizes, order, rank=r, world=world, workers=2) for r in range(world)], axis=1)
    reference = global_batches(
        epoch_order(sizes, seed=order.seed, epoch=3, block_size=order.block_size, shuffle=order.shuffle),
        global_batch_size=order.global_batch_size,
        lanes=order.lanes,
    )
    assert np.array_equal(joined, reference)


@given(stream=streams(), data=st.data())
@untimed
def test_resume_continues_exactly_with_any_workers(stream: Stream, data: st.DataObject) -> None:
    sizes, order = stream
    world = data.draw(st.sampled_from(divisors(order.global_batch_size)))
    full = rank_stream(sizes, order, rank=0, world=world, workers=data.draw(st.integers(1, 4)))
    step = data.draw(st.integers(0, len(full)))
    start = step * order.global_batch_size
    resumed = rank_stream(sizes, order, rank=0, world=world, workers=data.draw(st.integers(1, 4)), start=start)
    assert np.array_equal(resumed.reshape(-1), full[step:].reshape(-1))


def test_resume_refuses_a_partial_batch() -> None:
    order = OrderSettings(seed=0, global_batch_size=4)
    with pytest.raises(LogitcacheError, match="sample_in_epoch=3"):
        worker_samples([16], order, epoch=0, sample_in_epoch=3, rank=0, world_size=1, worker=0, num_workers=1)


def test_lanes_must_divide_the_global_batch() -> None:
    with pytest.raises(LogitcacheError, match="lanes=3 must divide global_batch_size=4"):
        OrderSettings(seed=0, global_batch_size=4, lanes=3)


@given(sizes=unit_sizes, cut=st.data())
@untimed
def test_clip_units_keeps_the_range(sizes: list[int], cut: st.DataObject) -> None:
    bounds = unit_bounds(sizes)
    start = cut.draw(st.integers(0, int(bounds[-1])))
    stop = cut.draw(st.integers(start, int(bounds[-1])))
    clipped = clip_units(bounds, start, stop)
    assert clipped.sum() == stop - start and (clipped > 0).all()


@given(sizes=unit_sizes, seed=st.integers(0, 1000), data=st.data())
@untimed
def test_read_plan_reconstructs_samples_and_frees_units_after_last_use(
    sizes: list[int], seed: int, data: st.DataObject
) -> None:
    bounds = unit_bounds(sizes)
    picked = np.random.default_rng(seed).permutation(int(bounds[-1]))[: data.draw(st.integers(0, sum(sizes)))]
    plan = read_plan(picked, bounds)
    rebuilt = [bounds[u] + plan.rows[u][s] for u, s in zip(plan.unit, plan.slot)]
    assert np.array_equal(np.array(rebuilt, dtype=np.int64), picked)
    for unit, rows in plan.rows.items():
        assert np.array_equal(rows, np.unique(rows))
        assert np.flatnonzero(plan.last & (plan.unit == unit)).tolist() == [np.flatnonzero(plan.unit == unit).max()]
