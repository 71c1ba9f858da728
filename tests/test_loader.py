"""CacheDataset and collate on small synthetic caches written with write_shard / write_manifest."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import needs_compiler

from logitcache.cache.format import FORMAT_VERSION, WindowTargets, from_table, read_shard, shard_metadata, write_shard
from logitcache.cache.layout import shard_name
from logitcache.cache.manifest import fingerprint, read_manifest, write_manifest
from logitcache.errors import LogitcacheError
from logitcache.loader import collate as collating
from logitcache.loader.collate import collate
from logitcache.loader.dataset import CacheDataset, check_student_vocab
from logitcache.native import library as native

SEQ_LEN = 5
VOCAB = 40
SAMPLES = 20
TOPK = 4


def synthetic_targets(rng: np.random.Generator, first_id: int, rows: int, method: str) -> WindowTargets:
    """Windows with distinct ids per position, descending log-probs, counts summing to SAMPLES."""
    positions = rows * (SEQ_LEN - 1)
    lengths = np.full(positions, TOPK) if method == "topk" else rng.integers(1, 7, size=positions)
    ids, logprobs, counts = [], [], []
    for width in lengths:
        ids.append(rng.choice(VOCAB, size=width, replace=False))
        logprobs.append(np.sort(np.log(rng.dirichlet(np.ones(width + 1))[:width]))[::-1])
        counts.append(1 + rng.multinomial(SAMPLES - width, np.full(width, 1 / width)))
    per_position = (rows, SEQ_LEN - 1)
    return WindowTargets(
        sequence_ids=np.arange(first_id, first_id + rows, dtype=np.int64),
        input_ids=rng.integers(0, VOCAB, size=(rows, SEQ_LEN), dtype=np.int32),
        target_lengths=lengths.astype(np.uint16).reshape(per_position),
        target_ids=np.concatenate(ids).astype(np.int32),
        target_logprobs=np.concatenate(logprobs).astype(np.float16),
        gold_logprob=rng.normal(-2, 1, size=per_position).astype(np.float16),
        tail_logprob=rng.normal(-3, 1, size=per_position).astype(np.float16) if method == "topk" else None,
        target_counts=np.concatenate(counts).astype(np.uint16) if method == "sample" else None,
    )


def make_cache(
    root: Path, *, method: str = "sample", shard_rows: tuple[int, ...] = (150, 150, 70), build_seed: int = 0
) -> WindowTargets:
    """Write a cache of ``len(shard_rows)`` shards under ``root``; return all its windows in order, as stored."""
    rng = np.random.default_rng(build_seed)
    shard_size, shards, parts = shard_rows[0], [], []
    params = {"k": TOPK} if method == "topk" else {"samples": SAMPLES, "proposal_temperature": 1.0}
    root.mkdir(parents=True, exist_ok=True)
    for index, rows in enumerate(shard_rows):
        targets = synthetic_targets(rng, index * shard_size, rows, method)
        write_shard(root / shard_name(index), targets, {"method": method, "params": params, "shard": index})
        shards.append({"file": shard_name(index), "rows": rows, "first_sequence_id": index * shard_size})
        parts.append(read_shard(root / shard_name(index)))
    identity = {"method": method, "params": params, "seed": build_seed, "shards": shard_rows}
    write_manifest(root, {
        "format": "logitcache", "format_version": FORMAT_VERSION, "logitcache_version": "test",
        "fingerprint": fingerprint(identity), "method": method, "params": params, "seq_len": SEQ_LEN,
        "seed": build_seed, "shard_size": shard_size, "vocab_size": VOCAB,
        "tokenizer": {"fingerprint": "tok-a", "vocab_size": VOCAB, "eos_token_id": 0},
        "shards": shards,
    })  # fmt: skip
    return WindowTargets.concat(parts)


def stream(dataset: CacheDataset, workers: int, limit: int | None = None) -> list[dict[str, torch.Tensor]]:
    batches = []
    for batch in dataset.dataloader(num_workers=workers):
        if len(batches) == limit:
            break
        batches.append(batch)
    return batches


def ids(batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return torch.cat([b["sequence_id"] for b in batches]).tolist() if batches else []


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    make_cache(root)
    return root


@pytest.fixture(params=["compiled", "numpy"])
def collate_path(request, monkeypatch) -> str:
    """Each collate test runs with the compiled dense layout and with its numpy fallback (LOGITCACHE_NATIVE=0)."""
    if request.param == "numpy":
        monkeypatch.setenv(native.ENV_SWITCH, "0")
    native.library.cache_clear()
    request.addfinalizer(native.library.cache_clear)
    if request.param == "compiled" and native.library() is None:
        pytest.skip("no C compiler: the numpy collate is the only one")
    return request.param


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_collated_batch_reproduces_stored_values(tmp_path: Path, method: str, collate_path: str, monkeypatch) -> None:
    source = make_cache(tmp_path, method=method, shard_rows=(30, 12))
    dataset = CacheDataset(tmp_path, seed=5, global_batch_size=7)
    calls = []
    real = collating.dense_rows
    monkeypatch.setattr(collating, "dense_rows", lambda *a: calls.append(a) or real(*a))
    for batch in stream(dataset, workers=0):
        widest = max(int(source.target_lengths[sid].max()) for sid in batch["sequence_id"].tolist())
        assert batch["target_ids"].shape == (7, SEQ_LEN - 1, widest)
        for row, sid in enumerate(batch["sequence_id"].tolist()):
            check_window(batch, row, source, sid, method)
    assert calls and (native.library() is not None) == (collate_path == "compiled")  # the path under test ran


def check_window(batch: dict[str, torch.Tensor], row: int, source: WindowTargets, sid: int, method: str) -> None:
    offsets = np.concatenate([[0], np.cumsum(source.target_lengths.reshape(-1), dtype=np.int64)])
    assert batch["input_ids"][row].tolist() == source.input_ids[sid].tolist()
    assert batch["labels"][row].tolist() == source.input_ids[sid, 1:].tolist()
    assert np.array_equal(batch["gold_logprob"][row].numpy(), source.gold_logprob[sid].astype(np.float32))
    for t in range(SEQ_LEN - 1):
        lo, hi = offsets[sid * (SEQ_LEN - 1) + t], offsets[sid * (SEQ_LEN - 1) + t + 1]
        width = hi - lo
        logprobs = source.target_logprobs[lo:hi].astype(np.float32)
        if method == "sample":
            weights = source.target_counts[lo:hi].astype(np.float32) / np.float32(SAMPLES)
            mass = np.exp(source.target_logprobs[lo:hi].astype(np.float64)).sum()
            with np.errstate(divide="ignore"):  # a position whose stored ids hold all the mass
                tail = np.float32(np.log(max(1.0 - mass, 0.0)))
        else:
            weights, tail = np.exp(logprobs), source.tail_logprob[sid, t].astype(np.float32)
        assert batch["target_ids"][row, t, :width].tolist() == source.target_ids[lo:hi].tolist()
        assert np.array_equal(batch["target_logprobs"][row, t, :width].numpy(), logprobs)
        assert np.array_equal(batch["target_weights"][row, t, :width].numpy(), weights)
        assert batch["tail_logprob"][row, t].item() == tail
        assert torch.equal(batch["target_mask"][row, t], torch.arange(batch["target_ids"].shape[-1]) < width)
        for padding in ("target_ids", "target_logprobs", "target_weights"):
            assert not batch[padding][row, t, width:].any()
    assert batch["position_mask"][row].all()


def test_a_cache_without_logprobs_collates_to_the_same_weights_and_nan_logprobs(sample_cache: Path, ids_only_cache: Path,
                                                                                collate_path: str) -> None:
    """A v4 sample cache built with --logprob-bits 0: the batch of the same windows as the default build's, but
    target_logprobs NaN at the stored ids (0 at padding) and tail_logprob NaN (the mass the draws missed is unknown)."""
    def batch(cache: Path) -> dict[str, torch.Tensor]:
        return next(iter(stream(CacheDataset(cache, seed=3, global_batch_size=5), workers=0, limit=1)))

    full, ids_only = batch(sample_cache), batch(ids_only_cache)
    assert set(full) == set(ids_only)
    for name in set(full) - {"target_logprobs", "tail_logprob"}:
        assert torch.equal(full[name], ids_only[name]), name
    mask = ids_only["target_mask"]
    assert mask.any() and ids_only["target_logprobs"][mask].isnan().all() and not ids_only["target_logprobs"][~mask].any()
    assert ids_only["tail_logprob"].isnan().all() and not full["tail_logprob"].isnan().any()


def test_collate_of_iterated_windows_equals_the_dataloader_batch(synthetic_cache: Path) -> None:
    dataset = CacheDataset(synthetic_cache, seed=0, global_batch_size=3)
    windows = list(itertools.islice(iter(dataset), 3))
    batch = collate(windows, read_manifest(synthetic_cache))
    assert_same_batches([batch], stream(dataset, workers=0, limit=1))
    dtypes = {name: str(tensor.dtype).removeprefix("torch.") for name, tensor in batch.items()}
    assert dtypes == {
        "input_ids": "int64", "labels": "int64", "sequence_id": "int64", "target_ids": "int64", "target_mask": "bool",
        "target_logprobs": "float32", "target_weights": "float32", "tail_logprob": "float32",
        "gold_logprob": "float32", "position_mask": "bool", "token_counts": "int64",
    }  # fmt: skip


def test_sample_tail_is_minus_infinity_once_the_stored_mass_reaches_one(collate_path: str) -> None:
    window = WindowTargets(
        sequence_ids=np.array([0]),
        input_ids=np.array([[1, 2, 3]], dtype=np.int32),
        target_lengths=np.array([[2, 1]], dtype=np.uint16),
        target_ids=np.array([4, 5, 6], dtype=np.int32),
        target_logprobs=np.array([0.0, -1.0, -1.0], dtype=np.float16),
        gold_logprob=np.zeros((1, 2), dtype=np.float16),
        target_counts=np.array([10, 10, 20], dtype=np.uint16),
    )
    batch = collate([window], {"params": {"samples": SAMPLES}})
    assert batch["tail_logprob"].tolist() == [[float("-inf"), np.float32(np.log(1 - np.exp(-1.0)))]]
    assert batch["target_weights"].tolist() == [[[0.5, 0.5], [1.0, 0.0]]]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_every_window_once_per_epoch_across_ranks_and_workers(synthetic_cache: Path, world: int, workers: int) -> None:
    per_rank = [
        ids(stream(CacheDataset(synthetic_cache, seed=1, global_batch_size=12, rank=r, world_size=world), workers))
        for r in range(world)
    ]
    seen = sum(per_rank, [])
    assert len({len(r) for r in per_rank}) == 1
    assert len(seen) == len(set(seen)) == 370 - 370 % 12
    assert set(seen) <= set(range(370))


def test_epochs_reshuffle_and_drop_different_windows(synthetic_cache: Path) -> None:
    dataset = CacheDataset(synthetic_cache, seed=1, global_batch_size=12)
    first = ids(stream(dataset, workers=0))
    dataset.set_epoch(1)
    second = ids(stream(dataset, workers=0))
    assert first != second and set(first) != set(second)


@pytest.mark.parametrize(("before", "after"), [(0, 2), (2, 0), (2, 1)])
def test_resume_after_k_batches_equals_the_uninterrupted_stream(synthetic_cache: Path, before: int, after: int) -> None:
    make = lambda: CacheDataset(synthetic_cache, seed=2, global_batch_size=8, block_size=64)  # noqa: E731
    full = stream(make(), workers=0)
    interrupted = make()
    head = stream(interrupted, workers=before, limit=5)
    resumed = make()
    resumed.load_state_dict(interrupted.state_dict(batches_consumed=5))
    assert_same_batches(head + stream(resumed, workers=after), full)


def test_resume_on_fewer_ranks_keeps_the_global_batches(synthetic_cache: Path) -> None:
    two = [CacheDataset(synthetic_cache, seed=3, global_batch_size=6, rank=r, world_size=2) for r in range(2)]
    global_ids = np.concatenate([np.array(ids(stream(d, workers=0))).reshape(-1, 3) for d in two], axis=1)
    state = two[0].state_dict(batches_consumed=4)
    with pytest.raises(LogitcacheError, match="lanes=2 but this dataset has lanes=1"):
        CacheDataset(synthetic_cache, seed=3, global_batch_size=6, rank=0, world_size=1).load_state_dict(state)
    one = CacheDataset(synthetic_cache, seed=3, global_batch_size=6, lanes=2, rank=0, world_size=1)
    one.load_state_dict(state)
    assert ids(stream(one, workers=2)) == global_ids[4:].reshape(-1).tolist()


def test_state_at_the_end_of_an_epoch_starts_the_next(synthetic_cache: Path) -> None:
    dataset = CacheDataset(synthetic_cache, seed=0, global_batch_size=10)
    state = dataset.state_dict(batches_consumed=dataset.steps_per_epoch)
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 0)
    with pytest.raises(LogitcacheError, match="not a whole number of global batches"):
        dataset.state_dict(batches_consumed=dataset.steps_per_epoch + 1)


@pytest.mark.parametrize(
    ("key", "value"), [("fingerprint", "0" * 64), ("seed", 9), ("global_batch_size", 16), ("block_size", 7)]
)
def test_state_from_another_stream_is_refused(synthetic_cache: Path, key: str, value: object) -> None:
    dataset = CacheDataset(synthetic_cache, seed=0, global_batch_size=8)
    state = dataset.state_dict(batches_consumed=1) | {key: value}
    with pytest.raises(LogitcacheError, match=f"state has {key}={value!r} but this dataset has {key}="):
        dataset.load_state_dict(state)


def test_check_student_vocab_names_the_mismatch(synthetic_cache: Path) -> None:
    manifest = read_manifest(synthetic_cache)
    check_student_vocab(manifest, VOCAB, "tok-a")
    with pytest.raises(LogitcacheError, match=f"student vocab_size 41 does not match the cache's vocab_size {VOCAB}"):
        check_student_vocab(manifest, 41)
    with pytest.raises(LogitcacheError, match="tok-b does not match the cache's tokenizer fingerprint tok-a"):
        check_student_vocab(manifest, VOCAB, "tok-b")


def test_holdout_reserves_the_last_windows_for_eval(synthetic_cache: Path) -> None:
    train = ids(stream(CacheDataset(synthetic_cache, seed=0, global_batch_size=10, holdout=50), workers=0))
    held = CacheDataset(synthetic_cache, seed=0, global_batch_size=10, holdout=50, split="eval", shuffle=False)
    assert sorted(ids(stream(held, workers=0))) == list(range(320, 370))
    assert max(train) < 320 and len(train) == 320


def test_each_row_group_is_decoded_once_per_epoch(synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads = []
    original = pq.ParquetFile.read_row_group
    def counted(self: pq.ParquetFile, i: int, **kwargs: object) -> object:
        reads.append(i)
        return original(self, i, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counted)
    stream(CacheDataset(synthetic_cache, seed=0, global_batch_size=10, block_size=128), workers=0)
    assert len(reads) == 5  # row groups of 128 + 22, 128 + 22, 70


def test_shard_that_does_not_match_the_manifest_is_named(tmp_path: Path) -> None:
    make_cache(tmp_path, shard_rows=(20, 20))
    make_cache(tmp_path / "other", shard_rows=(30,))
    (tmp_path / "other" / shard_name(0)).replace(tmp_path / shard_name(1))
    with pytest.raises(LogitcacheError, match=shard_name(1)):
        stream(CacheDataset(tmp_path, seed=0, global_batch_size=4), workers=0)


@pytest.mark.parametrize("swap", ["another shard", "another build"])
def test_a_shard_swapped_for_one_with_as_many_rows_is_refused(topk_cache: Path, tmp_path: Path, swap: str) -> None:
    shutil.copytree(topk_cache, tmp_path / "cache")
    manifest = read_manifest(tmp_path / "cache")
    first = tmp_path / "cache" / manifest["shards"][0]["file"]
    if swap == "another shard":
        shutil.copy(tmp_path / "cache" / manifest["shards"][1]["file"], first)
        message = "says it is shard 1 of build .* lists it as shard 0"
    else:  # the same shard with another build's fingerprint in its metadata
        targets = from_table(pq.read_table(first))
        write_shard(first, targets, {**shard_metadata(first), "build_fingerprint": "f" * 64})
        message = "says it is shard 0 of build ffffffffffff"
    assert pq.ParquetFile(first).metadata.num_rows == manifest["shards"][0]["rows"]
    with pytest.raises(LogitcacheError, match=message):
        stream(CacheDataset(tmp_path / "cache", seed=0, global_batch_size=2, shuffle=False), workers=0)


@pytest.mark.parametrize("damage, message", [("garbage", "cannot open a shard"), ("pages", "cannot be decoded")])
def test_a_damaged_shard_is_named_with_a_hint(tmp_path: Path, damage: str, message: str) -> None:
    make_cache(tmp_path, shard_rows=(40, 20))
    path = tmp_path / shard_name(0)
    if damage == "garbage":
        path.write_bytes(b"not parquet\n")
    else:  # flip the bytes of the data pages, keep the footer: opens, then fails to decompress
        data = bytearray(path.read_bytes())
        for i in range(len(data) // 8, len(data) // 2):
            data[i] ^= 0xFF
        path.write_bytes(bytes(data))
    with pytest.raises(LogitcacheError, match=f"{shard_name(0)}: .*{message}.*"):
        stream(CacheDataset(tmp_path, seed=0, global_batch_size=4, shuffle=False), workers=0)


@pytest.mark.parametrize("cache", ["topk_cache", "sample_cache"])
def test_real_build_streams_every_window_once(request: pytest.FixtureRequest, cache: str) -> None:
    root = request.getfixturevalue(cache)
    manifest = read_manifest(root)
    dataset = CacheDataset(root, seed=0, global_batch_size=4)
    batches = stream(dataset, workers=2)
    seen = ids(batches)
    assert len(seen) == len(set(seen)) == manifest["totals"]["sequences"] // 4 * 4
    assert all(int(b["target_ids"].max()) < manifest["vocab_size"] for b in batches)
    check_student_vocab(manifest, manifest["vocab_size"], manifest["tokenizer"]["fingerprint"])


def test_a_file_given_as_the_cache_is_named(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "a corpus, not a cache"}\n')
    with pytest.raises(LogitcacheError, match="corpus.jsonl is a file, not a cache: give the folder"):
        CacheDataset(corpus, seed=0, global_batch_size=2)


@needs_compiler
def test_dense_rows_lays_out_flat_columns_and_refuses_what_does_not_add_up():
    lengths = np.array([[2, 0], [1, 3]], dtype=np.uint16)
    ids = np.arange(1, 7, dtype=np.int32)
    logprobs, weights = -np.arange(6, dtype=np.float32), np.linspace(0.1, 0.6, 6, dtype=np.float32)
    covered = np.exp(logprobs.astype(np.float64))
    dense_ids, dense_logprobs, dense_weights, mask, mass = collating.dense_rows(lengths, 3, ids, logprobs, weights, covered)
    assert dense_ids.tolist() == [[[1, 2, 0], [0, 0, 0]], [[3, 0, 0], [4, 5, 6]]] and dense_ids.dtype == np.int64
    assert mask.tolist() == [[[True, True, False], [False] * 3], [[True, False, False], [True] * 3]]
    assert dense_logprobs[1, 1].tolist() == [-3.0, -4.0, -5.0] and dense_weights[0, 1].tolist() == [0.0] * 3
    assert mass.tolist() == [[covered[0] + covered[1], 0.0], [covered[2], covered[3] + covered[4] + covered[5]]]
    assert len(collating.dense_rows(lengths, 3, ids, logprobs, weights)) == 4  # no covered: no mass
    empty = collating.dense_rows(np.zeros((0, 4), np.uint16), 0, ids[:0], logprobs[:0], weights[:0])
    assert empty[0].shape == (0, 4, 0)
    # a position wider than the rows; short columns; columns not flat (the C side would read past them)
    for bad in ({"width": 2}, {"ids": ids[:5]}, {"covered": covered[:5]}, {"ids": np.zeros((6, 0), np.int32)},
                {"logprobs": logprobs.reshape(3, 2)}, {"width": -1}):
        args = {"width": 3, "ids": ids, "logprobs": logprobs, "weights": weights, "covered": covered} | bad
        with pytest.raises(ValueError):
            collating.dense_rows(lengths, **args)
    for bad_lengths in (np.array([[-65530, 0], [1, 3]]), lengths.astype(np.float32), np.array([[2, 0], [1, 70000]])):
        with pytest.raises(ValueError, match="lengths must be integers"):
            collating.dense_rows(bad_lengths, 3, ids, logprobs, weights)
