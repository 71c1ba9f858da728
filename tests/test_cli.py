"""The CLI's error paths: every known bad input is one red line, exit code 1, no traceback and no
manifest; error lines keep what rich would read as markup."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zstandard
from conftest import SEQ_LEN, run_cli


@pytest.fixture
def bad_inputs(teacher_dir, corpus_file, topk_cache, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    damaged = tmp_path / "damaged.jsonl.zst"
    packed = zstandard.ZstdCompressor().compress(corpus_file.read_bytes())
    damaged.write_bytes(packed[: len(packed) // 2] + bytes(64) + packed[len(packed) // 2 + 64 :])
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"body": list(range(100))}), numbers)
    folder = tmp_path / "corpus-folder"
    folder.mkdir()
    (folder / "docs.jsonl").write_bytes(corpus_file.read_bytes())
    a_file = tmp_path / "a-file"
    a_file.touch()
    return {
        "missing teacher": (["--teacher", str(tmp_path / "nope")], "not a directory"),
        "teacher without config": (["--teacher", str(tmp_path)], "no config.json"),
        "empty corpus": (["--corpus", str(empty)], "gives no document of 2 tokens or more"),
        "missing corpus": (["--corpus", str(tmp_path / "nope.jsonl")], "does not exist"),
        "a cache as corpus": (["--corpus", str(topk_cache)], "is a logitcache cache"),
        "missing text field": (["--text-field", "content"], "no field 'content'"),
        "seq-len beyond context": (["--seq-len", "4096"], "beyond the teacher's context"),
        "k beyond vocab": (["--k", "1000"], "larger than the teacher's vocabulary"),
        "N < 1": (["--method", "sample", "--samples", "0"], "at least 1"),
        "no log-probs in topk": (["--logprob-bits", "0"], "a top-k cache is its log-probabilities"),
        "no log-probs, tempered": (["--method", "sample", "--logprob-bits", "0", "--proposal-temperature", "0.5"],
                                   "RS-KD weights draws from a tempered proposal"),
        "unknown method": (["--method", "dense"], "choose one of"),
        "unknown BOS policy": (["--bos", "sometimes"], "--bos 'sometimes': choose one of auto, always, never"),
        "unknown packing": (["--packing", "greedy"], "--packing 'greedy': choose one of documents, stream"),
        "unknown dtype": (["--dtype", "fp16"], "choose one of float32, bfloat16, float16"),
        "not a device": (["--device", "gpu"], "not a torch device"),
        "chunk-mib 0": (["--chunk-mib", "0"], "must be at least 1"),
        "damaged zst": (["--corpus", str(damaged)], "not a readable zstd stream"),
        "numbers as text": (["--corpus", str(numbers), "--text-field", "body"], "holds int64, not text"),
        "out inside the corpus": (["--corpus", str(folder), "--out", str(folder / "cache")], "lies inside --corpus"),
        "out under a file": (["--out", str(a_file / "cache")], "Not a directory"),
        "gpu memory 5": (["--gpu-memory-utilization", "5"], "a fraction in (0, 1]"),
        "tensor parallel 0": (["--tensor-parallel-size", "0"], "must be at least 1"),
        "max seqs 0": (["--max-num-seqs", "0"], "must be at least 1"),
        **({} if torch.cuda.is_available() else {"no cuda": (["--device", "cuda"], "has no CUDA device")}),
    }


def test_bad_input_is_one_clear_line(teacher_dir, corpus_file, tmp_path, bad_inputs):
    for name, (override, message) in bad_inputs.items():
        args = {"--teacher": str(teacher_dir), "--corpus": str(corpus_file), "--out": str(tmp_path / name)}
        extra = []
        for i in range(0, len(override), 2):
            if override[i] in args:
                args[override[i]] = override[i + 1]
            else:
                extra += override[i : i + 2]
        result = run_cli("build", *[x for kv in args.items() for x in kv], "--seq-len", str(SEQ_LEN), *extra)
        assert result.returncode == 1, (name, result.stderr)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in result.stderr.replace("\n", " "), (name, result.stderr)
        assert "Traceback" not in result.stderr
        assert not (tmp_path / name / "manifest.json").exists()


def test_error_lines_keep_square_brackets(tmp_path):
    result = run_cli("inspect", str(tmp_path / "runs[old]"))
    assert result.returncode == 1 and f"{tmp_path / 'runs[old]' / 'manifest.json'} not found" in result.stdout + result.stderr
