"""The corpus (logitcache/corpus.py) as the build reads it: every format gives the same documents, packed
into the same windows; text files are one document each; null text is an empty document."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from conftest import SEQ_LEN, all_targets, build_cache
from transformers import AutoTokenizer

from logitcache.cache.manifest import read_manifest


def test_windows_are_the_packed_corpus(teacher_dir, corpus_file, topk_cache):
    """Documents + EOS, concatenated, cut into consecutive windows; sequence ids 0..N-1; remainder dropped."""
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    stream = []
    for line in corpus_file.read_text().splitlines():
        stream += tok(json.loads(line)["text"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    t = all_targets(topk_cache)
    manifest = read_manifest(topk_cache)
    n = len(stream) // SEQ_LEN
    assert np.array_equal(t.input_ids.reshape(-1), np.asarray(stream[: n * SEQ_LEN]))
    assert np.array_equal(t.sequence_ids, np.arange(n))
    assert manifest["corpus"]["dropped_tokens"] == len(stream) - n * SEQ_LEN
    assert manifest["corpus"]["tokens"] == len(stream)


def _corpus_variants(tmp_path: Path, docs: list[str]) -> dict[str, Path]:
    import datasets

    lines = "".join(json.dumps({"body": d}) + "\n" for d in docs)
    (tmp_path / "c.jsonl").write_text(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"body": docs}), tmp_path / "c.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "ds"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[:10]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs[10:]))
    return {"jsonl": tmp_path / "c.jsonl", "zst": tmp_path / "c.jsonl.zst", "parquet": tmp_path / "c.parquet",
            "datasets": tmp_path / "ds", "folder": folder}


def test_every_corpus_format_gives_the_same_windows(teacher_dir, documents, tmp_path):
    variants = _corpus_variants(tmp_path, documents[:25])
    results = {}
    for name, path in variants.items():
        out = tmp_path / f"out-{name}"
        build_cache(teacher_dir, path, out, method="topk", k=4, text_field="body")
        results[name] = all_targets(out).input_ids
    first = results.pop("jsonl")
    for name, ids in results.items():
        assert np.array_equal(first, ids), name


def test_text_files_are_one_document_each(teacher_dir, documents, tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, doc in enumerate(documents[:20]):
        (folder / f"{i:03d}.txt").write_text(doc)
    manifest = build_cache(teacher_dir, folder, tmp_path / "out", method="topk", k=4)
    assert manifest["corpus"]["documents"] == 20
    assert manifest["corpus"]["text_field"] is None  # no records, so no field; --text-field changes nothing
    assert build_cache(teacher_dir, folder, tmp_path / "out", method="topk", k=4, text_field="body") == manifest


def test_null_text_is_an_empty_document_in_every_format(tmp_path):
    from logitcache.corpus import Corpus

    (tmp_path / "c.jsonl").write_text('{"text": "a"}\n{"text": null}\n{"text": "b"}\n')
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        assert list(Corpus.open(tmp_path / name, "text").documents()) == ["a", "", "b"]
