"""The hf teacher (logitcache/teacher/): its checks before anything is written, the output head by chunks
of rows and through oneDNN on CPUs, and how the manifest names it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import build_cache, edited_teacher

from logitcache.errors import LogitcacheError


def test_a_teacher_giving_nan_is_refused_before_writing(teacher_dir, corpus_file, tmp_path):
    def poison(model, tokenizer):
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")

    broken = edited_teacher(teacher_dir, tmp_path / "nan-teacher", poison)
    for method in ("topk", "sample"):
        with pytest.raises(LogitcacheError, match="NaN"):
            build_cache(broken, corpus_file, tmp_path / method, method=method)
        assert not list((tmp_path / method).glob("shard-*.parquet"))


def test_head_chunks_budget_the_samplers_scratch():
    from logitcache.targets.rows import row_bytes
    from logitcache.targets.spec import TargetSpec
    from logitcache.teacher.head import head_chunk_rows

    topk, few, many = TargetSpec("topk", k=32), TargetSpec("sample", samples=50), TargetSpec("sample", samples=20_000)
    assert row_bytes(topk, 2048) == 3 * 4 * 2048
    assert row_bytes(few, 2048) < 1.5 * row_bytes(topk, 2048)  # N=50: the vocabulary-wide tensors dominate
    assert row_bytes(many, 2048) > 100 * row_bytes(topk, 2048)  # N=20k: the draws do
    assert head_chunk_rows(16, 2048, topk) == (16 << 20) // (12 * 2048)
    assert head_chunk_rows(16, 2048, many) == (16 << 20) // row_bytes(many, 2048) < head_chunk_rows(16, 2048, topk) // 100
    assert head_chunk_rows(1, 1 << 20, topk) == 1  # never 0 rows


def test_default_head_chunks_keep_enough_rows_on_cpu():
    from logitcache.targets.spec import TargetSpec
    from logitcache.teacher.head import head_chunk_rows
    from logitcache.teacher.options import CPU_CHUNK_MIB, CPU_MIN_CHUNK_ROWS, CUDA_CHUNK_MIB

    topk, vocab = TargetSpec("topk", k=32), 262_144
    assert head_chunk_rows(None, 2048, topk, "cpu") == (CPU_CHUNK_MIB << 20) // (12 * 2048) > CPU_MIN_CHUNK_ROWS
    assert head_chunk_rows(None, vocab, topk, "cpu") == CPU_MIN_CHUNK_ROWS > head_chunk_rows(CPU_CHUNK_MIB, vocab, topk)
    assert head_chunk_rows(None, vocab, topk, "cuda") == (CUDA_CHUNK_MIB << 20) // (12 * vocab)
    assert head_chunk_rows(1, vocab, topk, "cpu") == 1  # a given --chunk-mib stays a bound


def test_output_head_goes_through_onednn_and_matches_torch(monkeypatch):
    from types import SimpleNamespace

    from logitcache.teacher import head as teacher

    monkeypatch.delenv(teacher.ONEDNN_SWITCH, raising=False)
    calls = []
    real = teacher._onednn_linear
    monkeypatch.setattr(teacher, "_onednn_linear", lambda h, w, b=None: calls.append(h.shape) or real(h, w, b))
    onednn = teacher.onednn_usable()
    g = torch.Generator().manual_seed(0)
    for rows, hidden, vocab in ((1, 8, 5), (37, 100, 2000), (256, 128, 2048)):
        h = torch.randn(rows, hidden, generator=g)
        w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
        ours = teacher.output_head(h, w, SimpleNamespace())
        torch.testing.assert_close(ours, torch.nn.functional.linear(h, w), rtol=1e-5, atol=1e-5)
        assert calls[-1:] == ([h.shape] if onednn else [])  # the head went through oneDNN wherever it can
    made = len(calls)
    half = teacher.linear(h.bfloat16(), w.bfloat16())
    with torch.enable_grad():
        needs_grad = h.clone().requires_grad_()
        teacher.linear(needs_grad, w).sum().backward()  # the oneDNN op has no gradient: torch's linear runs
    assert needs_grad.grad is not None and half.dtype == torch.bfloat16 and len(calls) == made
    monkeypatch.setenv(teacher.ONEDNN_SWITCH, "0")
    assert torch.equal(teacher.linear(h, w), torch.nn.functional.linear(h, w)) and len(calls) == made


@pytest.mark.parametrize("broken", ["raises", "disagrees"])
def test_output_head_falls_back_when_onednn_is_unusable(monkeypatch, caplog, broken):
    from logitcache.teacher import head as teacher

    def op(hidden, weight, bias=None):
        if broken == "raises":
            raise RuntimeError("No such operator mkldnn::_linear_pointwise")
        return torch.nn.functional.linear(hidden, weight, bias) + 1.0

    monkeypatch.delenv(teacher.ONEDNN_SWITCH, raising=False)
    monkeypatch.setattr(teacher, "_onednn_linear", op)
    monkeypatch.setattr(teacher.platform, "machine", lambda: "x86_64")
    teacher.onednn_usable.cache_clear()
    try:
        h, w = torch.randn(4, 16), torch.randn(32, 16)
        assert torch.equal(teacher.linear(h, w), torch.nn.functional.linear(h, w))
        assert not teacher.onednn_usable()
        if torch.backends.mkldnn.is_available():
            assert "CPU teachers use" in caplog.text
    finally:
        teacher.onednn_usable.cache_clear()


def test_cpu_teacher_runs_its_decoder_linears_through_onednn(monkeypatch, teacher_dir):
    from transformers import AutoModelForCausalLM

    from logitcache.teacher import head as teacher
    from logitcache.teacher.hf import HFTeacher

    monkeypatch.delenv(teacher.ONEDNN_SWITCH, raising=False)
    onednn = teacher.onednn_usable()  # its probe, if it runs now, is not the model's
    calls = []
    real = teacher._onednn_linear
    monkeypatch.setattr(teacher, "_onednn_linear", lambda h, w, b=None: calls.append(w.shape) or real(h, w, b))
    ours = HFTeacher(teacher_dir, device="cpu")
    plain = AutoModelForCausalLM.from_pretrained(str(teacher_dir), local_files_only=True).eval()
    linears = [m for m in plain.modules() if isinstance(m, torch.nn.Linear)]
    ids = torch.randint(0, ours.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        routed = ours.hidden_states(ids)
        reference = plain.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        logits = ours.model(input_ids=ids).logits
    torch.testing.assert_close(routed, reference, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, plain(input_ids=ids).logits.detach(), rtol=1e-4, atol=1e-4)
    if onednn:  # every projection of the decoder and the model's lm_head went through oneDNN
        assert len(linears) > 2 and len(calls) == 2 * len(linears) - 1
    made = len(calls)
    ours.model(input_ids=ids).logits.sum().backward()  # outside inference mode with trainable weights: torch's linear
    assert len(calls) == made and all(p.grad is not None for p in ours.model.get_decoder().parameters() if p.requires_grad)
    monkeypatch.setenv(teacher.ONEDNN_SWITCH, "0")
    with torch.inference_mode():
        assert torch.equal(ours.hidden_states(ids), reference) and len(calls) == made


def test_the_manifest_names_the_teacher_by_an_absolute_path(teacher_dir, monkeypatch):
    from logitcache.teacher.hf import HFTeacher

    monkeypatch.chdir(teacher_dir.parent)  # train looks the tokenizer up by this path, from wherever it runs
    assert HFTeacher(Path(teacher_dir.name), device="cpu").describe()["path"] == str(teacher_dir.resolve())
