"""The contexts a teacher sees: BOS policy, documents or stream packing, rows of different lengths,
recorded in the manifest and given back to the student as they were built."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import all_targets, build_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.cache.format import METADATA_KEY
from logitcache.cache.manifest import read_manifest
from logitcache.cache.summary import summarize
from logitcache.cache.validate import validate_cache
from logitcache.corpus import Layout, PackingStats, document_rows, pack_windows, resolve_layout
from logitcache.demo import TeacherSizes, make_teacher, pretraining, stdlib_docstrings, write_corpus
from logitcache.errors import LogitcacheError
from logitcache.loader.dataset import CacheDataset
from logitcache.targets.spec import TargetSpec
from logitcache.teacher.hf import HFTeacher
from logitcache.train.loop import run_train
from logitcache.train.settings import TrainSettings

ROW = 64  # the BOS teacher's pretraining windows, and the longest row of its caches


def test_document_rows_start_with_bos_and_continue_with_one():
    stats = PackingStats()
    doc = np.arange(10, 20)  # 10 tokens, EOS included
    rows = list(document_rows(iter([doc, np.array([7, 8])]), 4, stats, bos_id=1))
    # 3 tokens of the document per row after the BOS (its EOS, 19, left alone, is no row); [7, 8] is a row of 3
    assert [r.tolist() for r in rows] == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 7, 8]]
    assert stats.tokens == 4 and stats.dropped_tokens == 1  # the BOS tokens are counted, the lone EOS dropped


def test_document_rows_drop_empty_documents_and_a_lone_eos():
    stats = PackingStats()
    eos = 2
    rows = list(document_rows(iter([np.array([5, 6, 7, eos]), np.array([eos])]), 4, stats, bos_id=1))
    assert [r.tolist() for r in rows] == [[1, 5, 6, 7]]  # no [BOS, EOS] row: neither the cut-off EOS nor the empty document
    assert stats.dropped_tokens == 2


def test_document_rows_without_bos_drop_what_predicts_nothing():
    stats = PackingStats()
    rows = list(document_rows(iter([np.arange(5), np.array([9])]), 4, stats))
    assert [r.tolist() for r in rows] == [[0, 1, 2, 3]]  # [4] and [9] are single tokens: no position
    assert stats.dropped_tokens == 2


def test_stream_windows_start_with_bos_without_doubling_it():
    stats = PackingStats()
    pieces = [np.array([10, 11, 12, 2]), np.array([20, 2])]  # documents with their EOS (2)
    windows = [w.tolist() for w in pack_windows(iter(pieces), 4, stats, bos_id=1)]
    # BOS 10 11 12 | (cut: BOS again) 2 BOS 20 2 -> the second window starts with the added BOS
    assert windows == [[1, 10, 11, 12], [1, 2, 1, 20]]
    assert stats.dropped_tokens == 2  # the last EOS and the BOS that would have begun the next window


def test_bos_policy_follows_the_tokenizer(bos_teacher, teacher_dir):
    with_bos = AutoTokenizer.from_pretrained(str(bos_teacher))
    without = AutoTokenizer.from_pretrained(str(teacher_dir))  # EOS doubles as BOS but is never added
    assert resolve_layout(with_bos).bos_token_id == with_bos.bos_token_id
    assert resolve_layout(without).bos_token_id is None
    assert resolve_layout(without, "always").bos_token_id == without.bos_token_id
    assert resolve_layout(with_bos, "never", "stream") == Layout("stream", None, with_bos.eos_token_id)
    without.bos_token = None
    with pytest.raises(LogitcacheError, match="--bos always: the tokenizer has no BOS token"):
        resolve_layout(without, "always")


@pytest.fixture(scope="module")
def bos_teacher(tmp_path_factory):
    """A teacher pretrained with its tokenizer's BOS at every window and document start (300 steps)."""
    folder = tmp_path_factory.mktemp("bos-teacher")
    documents = list(itertools.islice(stdlib_docstrings(), 300))
    write_corpus(folder / "corpus.jsonl", iter(documents))
    make_teacher(folder, documents, TeacherSizes(512, "nano", max_positions=128, bos=True))
    settings = pretraining(folder, 300, seq_len=ROW, eval_every=0)
    run_train(settings)
    return settings.out / "student"


@pytest.fixture(scope="module")
def short_documents(bos_teacher, tmp_path_factory):
    """The documents that fit one row with their BOS and EOS: each is one row of a documents cache."""
    tok = AutoTokenizer.from_pretrained(str(bos_teacher))
    docs = [d for d in itertools.islice(stdlib_docstrings(), 300) if len(tok(d)["input_ids"]) + 1 <= ROW]
    path = tmp_path_factory.mktemp("short") / "short.jsonl"
    write_corpus(path, iter(docs))
    return path, docs


def _reference_perplexity(teacher, docs) -> float:
    """The teacher on one document at a time, by plain transformers: BOS + text + EOS, as its tokenizer gives them."""
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(teacher))
    nll = count = 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([tok(doc)["input_ids"] + [tok.eos_token_id]])
            logprobs = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])
            nll, count = nll - float(logprobs.sum()), count + logprobs.numel()
    return math.exp(nll / count)


def test_teacher_sees_what_it_was_trained_on(bos_teacher, short_documents, tmp_path):
    """Documents alone behind their BOS: the teacher's own perplexity, within 2 %; a stream without BOS is clearly worse."""
    corpus, docs = short_documents
    reference = _reference_perplexity(bos_teacher, docs)
    build_cache(bos_teacher, corpus, tmp_path / "faithful", seq_len=ROW, packing="documents", bos="auto")
    build_cache(bos_teacher, corpus, tmp_path / "packed", seq_len=ROW, packing="stream", bos="never")
    faithful, packed = summarize(tmp_path / "faithful"), summarize(tmp_path / "packed")
    assert faithful["teacher_perplexity"] == pytest.approx(reference, rel=0.02)
    assert packed["teacher_perplexity"] > 1.08 * reference, (packed["teacher_perplexity"], reference)
    assert packed["teacher_perplexity_by_position"]["0-31"] > faithful["teacher_perplexity_by_position"]["0-31"]


def test_documents_cache_holds_each_document_as_its_tokenizer_gives_it(bos_teacher, short_documents, tmp_path):
    corpus, docs = short_documents
    out = tmp_path / "cache"
    build_cache(bos_teacher, corpus, out, seq_len=ROW, packing="documents", batch_size=3, shard_size=16)
    tok = AutoTokenizer.from_pretrained(str(bos_teacher))
    targets = all_targets(out)
    rows = [row[:n].tolist() for row, n in zip(targets.input_ids, targets.tokens())]
    assert rows == [tok(d)["input_ids"] + [tok.eos_token_id] for d in docs]
    assert np.array_equal(targets.sequence_ids, np.arange(len(docs)))  # batched by length, written in order
    manifest = read_manifest(out)
    layout = {"format": "text", "packing": "documents", "bos": "auto", "bos_token_id": tok.bos_token_id,
              "eos_token_id": tok.eos_token_id}
    assert manifest["layout"] == layout
    assert manifest["totals"]["tokens"] == sum(len(r) for r in rows)
    assert manifest["totals"]["positions"] == sum(len(r) - 1 for r in rows)
    shard = json.loads(pq.read_schema(out / manifest["shards"][0]["file"]).metadata[METADATA_KEY])
    assert shard["layout"] == layout
    assert validate_cache(out) == []
    # padding stores nothing: every real position has k ids, every padded one none
    real = np.arange(ROW - 1)[None, :] < (targets.tokens() - 1)[:, None]
    assert (targets.target_lengths[real] == manifest["params"]["k"]).all() and (targets.target_lengths[~real] == 0).all()


def test_long_documents_continue_in_rows_of_their_own(bos_teacher, corpus_file, tmp_path):
    out = tmp_path / "cache"
    build_cache(bos_teacher, corpus_file, out, seq_len=16, packing="documents", method="sample", samples=8)
    tok = AutoTokenizer.from_pretrained(str(bos_teacher))
    targets = all_targets(out)
    assert (targets.input_ids[:, 0] == tok.bos_token_id).all() and targets.tokens().max() == 16
    body = np.concatenate([row[1:n] for row, n in zip(targets.input_ids, targets.tokens())])
    expected = []
    for line in corpus_file.read_text().splitlines():
        doc = tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        pieces = [doc[i : i + 15] for i in range(0, len(doc), 15)]
        expected += [t for i, piece in enumerate(pieces) if not (i and len(piece) == 1) for t in piece]
    # nothing lost, nothing doubled: every row is BOS + the next 15 tokens (a lone EOS left over is no row)
    assert body.tolist() == expected
    assert validate_cache(out) == []


def test_a_padded_batch_gives_each_row_its_targets_alone(bos_teacher):
    """Right padding needs no mask (attention is causal): a row's targets do not depend on the batch around it."""
    teacher = HFTeacher(bos_teacher)
    rng = np.random.default_rng(0)
    counts = np.array([12, 5, 9])
    batch = np.zeros((3, 12), dtype=np.int64)
    for row, n in zip(batch, counts):
        row[:n] = rng.integers(3, 500, n)
    spec = TargetSpec("topk", k=4)
    together = teacher.compute(batch, np.arange(3), spec, counts)
    assert np.array_equal(together.tokens(), counts)
    for i, n in enumerate(counts):
        alone = teacher.compute(batch[i : i + 1, :n], np.array([i]), spec)
        got = together.select(np.array([i]))
        assert np.array_equal(got.input_ids[0, :n], alone.input_ids[0])
        np.testing.assert_allclose(got.gold_logprob[0, : n - 1].astype(np.float32), alone.gold_logprob[0].astype(np.float32),
                                   atol=2e-3)
        assert np.array_equal(got.target_lengths[0, : n - 1], alone.target_lengths[0])
        assert (got.target_lengths[0, n - 1 :] == 0).all()


def test_student_reads_the_rows_as_the_teacher_saw_them(bos_teacher, short_documents, tmp_path):
    corpus, _ = short_documents
    cache = tmp_path / "cache"
    build_cache(bos_teacher, corpus, cache, seq_len=ROW, packing="documents", shard_size=32)
    stored = all_targets(cache)
    dataset = CacheDataset(cache, seed=0, global_batch_size=8, shuffle=False)
    batch = next(iter(dataset.dataloader()))
    n = stored.tokens()[:8]
    width = batch["input_ids"].shape[1]
    assert width == n.max()
    assert torch.equal(batch["input_ids"], torch.from_numpy(stored.input_ids[:8, :width].astype(np.int64)))
    assert torch.equal(batch["position_mask"], torch.arange(width - 1)[None, :] < torch.from_numpy(n - 1)[:, None])
    metrics = run_train(TrainSettings(out=tmp_path / "run", cache=cache, loss="topk-ghost", student="nano", steps=3,
                                      batch_size=4, eval_every=3, eval_windows=4, save_every=0, device="cpu"))
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["eval_lm_loss"])


def test_packed_rows_give_the_loss_of_the_rows_alone(bos_teacher, short_documents, tmp_path):
    """Several rows per student row, position ids restarting: the same loss (every term) as the padded rows,
    on fewer, fuller rows."""
    from logitcache.loader.collate import pack_batch
    from logitcache.losses.sparse import get_loss
    from logitcache.train.objective import student_outputs

    corpus, _ = short_documents
    cache = tmp_path / "cache"
    build_cache(bos_teacher, corpus, cache, seq_len=ROW, packing="documents", shard_size=64)
    batch = next(iter(CacheDataset(cache, seed=3, global_batch_size=16).dataloader()))
    packed = pack_batch(batch)
    assert len(packed["input_ids"]) < len(batch["input_ids"])
    assert packed["position_mask"].sum() == batch["position_mask"].sum()
    assert sorted(packed["sequence_id"][packed["sequence_id"] >= 0].tolist()) == sorted(batch["sequence_id"].tolist())
    useful = [float(b["token_counts"].sum()) / b["input_ids"].numel() for b in (batch, packed)]
    assert useful[1] > useful[0]
    student = AutoModelForCausalLM.from_pretrained(str(bos_teacher), dtype=torch.float32).eval()
    loss = get_loss("topk-ghost")
    with torch.no_grad():
        alone = loss(student_outputs(student, batch, fused=False), batch)
        together = loss(student_outputs(student, packed, fused=False), packed)
    assert together.tokens == alone.tokens
    assert float(together.total) == pytest.approx(float(alone.total), rel=1e-5)
