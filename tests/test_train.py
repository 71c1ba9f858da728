"""``logitcache train``: CE from text, KD from real caches, exact resume, accumulation, vocab checks.

One module-wide world made in a temporary folder: stdlib docstrings, a BPE tokenizer, a nano
teacher pretrained for a few steps with ``train --corpus`` (the demo's way), and two caches built
from it with ``run_build`` (sampled and top-k). Every run is tiny: hidden 64, 2 layers, 32 tokens.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import processes
import pytest
import torch

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.demo import TeacherSizes, make_teacher, pretraining, stdlib_docstrings, write_corpus
from logitcache.errors import LogitcacheError
from logitcache.train.evaluate import ECE_BINS, calibration_bins, expected_calibration_error
from logitcache.train.loop import run_train
from logitcache.train.metrics import read_metrics
from logitcache.train.optim import lr_factor
from logitcache.train.settings import TrainSettings
from logitcache.train.student import llama_config

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN = 32
VOCAB = 384
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LOGITCACHE_DEBUG": "1", "HF_HUB_OFFLINE": "1"}


def _small(out: Path, **options) -> TrainSettings:
    """Settings of a few-step nano run on the CPU; ``options`` override."""
    defaults = dict(student="nano", steps=8, batch_size=4, lr=3e-3, warmup_steps=None, eval_every=4,
                    eval_windows=8, save_every=0, device="cpu")
    return TrainSettings(out=out, **{**defaults, **options})


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("train")
    docs = list(stdlib_docstrings(max_bytes=20_000))
    write_corpus(root / "corpus.jsonl", iter(docs))
    # The nano model the trainer would make for --student nano (seed 0, 1024 positions), bit for bit.
    make_teacher(root, docs, TeacherSizes(VOCAB, "nano", max_positions=1024))
    teacher_run = pretraining(root, 30, SEQ_LEN, batch_size=8, warmup_steps=5, eval_every=15, eval_windows=16,
                              save_every=0, device="cpu")
    records = []
    final = run_train(teacher_run, on_step=records.append)
    teacher = Path(final["student"])
    caches = {}
    for name, method, packing in (("sample", "sample", "stream"), ("topk", "topk", "stream"), ("documents", "sample", "documents")):
        caches[name] = root / f"cache-{name}"
        run_build(BuildSettings(teacher=teacher, corpus=root / "corpus.jsonl", out=caches[name], method=method,
                                k=8, samples=16, seq_len=SEQ_LEN, batch_size=32, shard_size=64, device="cpu", packing=packing))
    return SimpleNamespace(root=root, teacher=teacher, teacher_run=teacher_run, teacher_records=records,
                           teacher_final=final, caches=caches)


def _train_losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def test_ce_from_corpus_trains_and_its_loss_falls(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = world.teacher_run.out
    records = read_metrics(out / "metrics.jsonl")
    assert records == world.teacher_records  # on_step saw exactly what metrics.jsonl holds
    losses = _train_losses(out)
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[-1]["lm_loss"] < math.log(VOCAB)
    assert 0.0 <= evals[-1]["ece"] <= 1.0 and "kd_loss" not in evals[-1]
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    model = AutoModelForCausalLM.from_pretrained(world.teacher, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(world.teacher, local_files_only=True)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer) == VOCAB


@pytest.mark.parametrize("method, loss, eval_on", [("sample", "rs-kd", "holdout"), ("topk", "topk-ghost", "eval-cache")])
def test_kd_from_a_cache(world, tmp_path, method, loss, eval_on):
    from transformers import AutoModelForCausalLM

    eval_cache = world.caches["sample"] if eval_on == "eval-cache" else None
    records = []
    final = run_train(_small(tmp_path, cache=world.caches[method], loss=loss, eval_cache=eval_cache), on_step=records.append)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    last = [r for r in records if r["kind"] == "eval"][-1]
    assert last["step"] == 8 and last["tokens"] == 8 * (SEQ_LEN - 1)
    assert math.isfinite(last["kd_loss"]) and math.isfinite(last["lm_loss"])
    assert 0.0 <= last["ece"] <= 1.0 and 0.0 <= last["top1_agreement"] <= 1.0
    assert final["eval_kd_loss"] == last["kd_loss"]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", local_files_only=True)
    assert student.get_output_embeddings().weight.shape[0] == VOCAB
    assert (tmp_path / "student" / "tokenizer.json").is_file()  # found through the manifest's teacher path


def test_rs_kd_trains_the_same_on_a_cache_without_logprobs(world, tmp_path):
    """A sample cache built with --logprob-bits 0 (format v4) holds the same draws: RS-KD (proposal temperature 1)
    learns from the counts alone, so the run is the same to the bit; every other loss is refused with one line."""
    ids_only = world.root / "cache-sample-ids-only"
    if not ids_only.exists():
        run_build(BuildSettings(teacher=world.teacher, corpus=world.root / "corpus.jsonl", out=ids_only, method="sample",
                                samples=16, logprob_bits=0, seq_len=SEQ_LEN, batch_size=32, shard_size=64, device="cpu",
                                packing="stream"))
    full, bare = [], []
    run_train(_small(tmp_path / "full", cache=world.caches["sample"], loss="rs-kd"), on_step=full.append)
    run_train(_small(tmp_path / "bare", cache=ids_only, loss="rs-kd"), on_step=bare.append)
    assert len(full) == len(bare) > 8
    for a, b in zip(full, bare):
        assert a.keys() == b.keys() and a["kind"] == b["kind"]
        for key in ("loss", "lm_loss", "kd_loss", "ece"):
            assert a.get(key) == b.get(key), (a["step"], key)
        if a["kind"] == "eval":  # the most drawn id stands for the teacher's top one
            assert 0.0 <= b["top1_agreement"] <= 1.0
    for loss in ("kl", "topk-ghost", "bild"):
        with pytest.raises(LogitcacheError, match=f"--loss {loss} needs the teacher's log-probabilities"):
            run_train(_small(tmp_path / loss, cache=ids_only, loss=loss))
        assert not (tmp_path / loss / "metrics.jsonl").exists()
    with pytest.raises(LogitcacheError, match="--eval-cache .* was built with --logprob-bits 0"):
        run_train(_small(tmp_path / "eval", cache=world.caches["sample"], loss="kl", eval_cache=ids_only))
    final = run_train(_small(tmp_path / "ce", cache=ids_only, loss="ce", steps=2, eval_every=2))  # ce reads no targets
    assert math.isfinite(final["eval_lm_loss"]) and 0.0 <= final["eval_top1_agreement"] <= 1.0


def test_teacher_top_ids_of_a_cache_without_logprobs_is_the_most_drawn_id():
    from logitcache.train.evaluate import teacher_top_ids

    batch = {"target_ids": torch.tensor([[[7, 3, 9, 0], [4, 5, 0, 0]]]),
             "target_weights": torch.tensor([[[0.25, 0.5, 0.25, 0.0], [0.125, 0.875, 0.0, 0.0]]]),
             "target_mask": torch.tensor([[[True, True, True, False], [True, True, False, False]]])}
    nan = torch.where(batch["target_mask"], math.nan, 0.0)
    assert teacher_top_ids({**batch, "target_logprobs": nan}).tolist() == [[3, 5]]
    known = torch.tensor([[[-0.5, -2.0, -1.0, 0.0], [-0.1, -3.0, 0.0, 0.0]]])  # the teacher's own ranking wins
    assert teacher_top_ids({**batch, "target_logprobs": known}).tolist() == [[7, 4]]


def test_grad_accumulation_equals_one_large_batch(world, tmp_path):
    common = dict(cache=world.caches["sample"], loss="rs-kd", steps=2, eval_every=0)
    run_train(_small(tmp_path / "one", batch_size=4, grad_accum=1, **common))
    run_train(_small(tmp_path / "two", batch_size=2, grad_accum=2, **common))
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-6, abs=0)
    # Adam hides a uniform gradient scale in the next loss; the (pre-clipping) norm shows it.
    assert two[0]["grad_norm"] == pytest.approx(one[0]["grad_norm"], rel=1e-5, abs=0)
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-5, abs=0)


def _cli(out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "logitcache", "train", "--cache", str(cache), "--loss", "rs-kd", "--out", str(out),
            "--student", "nano", "--steps", "40", "--batch-size", "8", "--grad-accum", "2", "--lr", "3e-3",
            "--warmup-steps", "4", "--eval-every", "10", "--eval-windows", "8", "--save-every", "5", "--seed", "3",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("cache_kind", ["sample", "documents"])
def test_resume_after_sigkill_gives_the_same_losses_bit_for_bit(world, tmp_path, cache_kind):
    """Also on a cache of rows of different lengths, packed several to a student row at every step."""
    cache = world.caches[cache_kind]
    # --resume on a fresh folder starts from step 0, and says so.
    reference = processes.run(_cli(tmp_path / "reference", cache, "--resume"), cwd=REPO, env=SUBPROCESS_ENV)
    assert reference.returncode == 0, reference.stderr
    assert f"note: no checkpoint in {tmp_path / 'reference'}: starting from step 0" in reference.stderr.replace("\n", "")

    out = tmp_path / "interrupted"
    with processes.tracked(_cli(out, cache), cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE) as process:
        while not (out / "checkpoint" / "trainer.pt").is_file() and process.poll() is None:
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate()
    assert process.returncode == -signal.SIGKILL, stderr.decode()  # killed mid-run, not finished
    assert len(_train_losses(out)) < 40

    resumed = processes.run(_cli(out, cache, "--resume"), cwd=REPO, env=SUBPROCESS_ENV)
    assert resumed.returncode == 0, resumed.stderr
    expected = read_metrics(tmp_path / "reference" / "metrics.jsonl")
    assert len([r for r in expected if r["kind"] == "train"]) == 40
    assert read_metrics(out / "metrics.jsonl") == expected  # every train and eval record, exactly
    weights = "student/model.safetensors"
    assert (out / weights).read_bytes() == (tmp_path / "reference" / weights).read_bytes()


def _student_with_vocab(tmp_path: Path, source: str, vocab_size: int) -> dict:
    config = llama_config(vocab_size, "nano", 64)
    if source == "student_config":
        path = tmp_path / "config.json"
        path.write_text(config.to_json_string())
        return {"student": None, "student_config": path}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    return {"student": None, "init_from": tmp_path / "model"}


@pytest.mark.parametrize("source", ["student_config", "init_from"])
def test_a_student_with_another_vocabulary_is_refused(world, tmp_path, source):
    settings = _small(tmp_path / "out", cache=world.caches["topk"], loss="kl", **_student_with_vocab(tmp_path, source, 500))
    with pytest.raises(LogitcacheError, match=f"student vocab_size 500 .* vocab_size {VOCAB}"):
        run_train(settings)
    assert not (tmp_path / "out").exists()  # refused before training: --out is not created


def test_a_folder_holding_a_run_needs_resume(world):
    with pytest.raises(LogitcacheError, match="--resume"):
        run_train(replace(world.teacher_run, steps=31))
    with pytest.raises(LogitcacheError, match="steps=30"):
        run_train(replace(world.teacher_run, steps=31, resume=True))


def test_a_finished_student_whose_checkpoint_was_deleted_is_not_overwritten(world, tmp_path):
    import shutil

    settings = _small(tmp_path, cache=world.caches["topk"], loss="kl", steps=2, eval_every=0)
    run_train(settings)
    shutil.rmtree(tmp_path / "checkpoint")  # what a user does to save the optimizer's disk space
    kept = {p: p.read_bytes() for p in [tmp_path / "metrics.jsonl", *(tmp_path / "student").iterdir()]}
    for again in (settings, replace(settings, resume=True), replace(settings, seed=1)):
        with pytest.raises(LogitcacheError, match="holds a trained student"):
            run_train(again)
    assert {p: p.read_bytes() for p in kept} == kept


@pytest.mark.parametrize("config, context", [
    ({"model_type": "gpt2", "n_positions": 16, "n_embd": 32, "n_layer": 1, "n_head": 2}, 16),
    ({"model_type": "opt", "max_position_embeddings": SEQ_LEN - 2, "hidden_size": 32, "num_hidden_layers": 1,
      "num_attention_heads": 2, "ffn_dim": 64, "word_embed_proj_dim": 32}, SEQ_LEN - 2),  # a table with an offset
])
def test_a_student_whose_context_is_shorter_than_the_windows_is_refused(world, tmp_path, config, context):
    import json

    (tmp_path / "student.json").write_text(json.dumps({**config, "vocab_size": VOCAB}))
    config = tmp_path / "student.json"
    out = tmp_path / "out"
    with pytest.raises(LogitcacheError, match=f"at most {context} positions .* windows are {SEQ_LEN} tokens, and a window fails"):
        run_train(_small(out, cache=world.caches["topk"], loss="kl", student=None, student_config=config))
    assert not out.exists()


def test_a_rotary_student_with_a_short_configured_context_trains_with_a_note(world, tmp_path, caplog):
    import json

    caplog.set_level("INFO", logger="logitcache")
    config = tmp_path / "llama.json"
    config.write_text(json.dumps({**llama_config(VOCAB, "nano", 16).to_dict(), "max_position_embeddings": 16}))
    final = run_train(_small(tmp_path / "out", cache=world.caches["topk"], loss="kl", student=None, student_config=config,
                             steps=2, eval_every=0))
    assert math.isfinite(final["loss"]) and f"context of 16 positions, shorter than the {SEQ_LEN}-token" in caplog.text


def test_evaluation_with_the_fused_head_makes_logits_by_chunks_of_rows(world, tmp_path):
    from contextlib import nullcontext

    from logitcache.losses.fused import default_chunk_rows, linear_head
    from logitcache.train.data import open_cache
    from logitcache.train.distributed import World
    from logitcache.train.evaluate import evaluate
    from logitcache.train.objective import make_loss
    from logitcache.train.student import build_student

    settings = _small(tmp_path, cache=world.caches["topk"], loss="topk-ghost", batch_size=24, eval_windows=48)
    data = open_cache(settings, 24, World(), 1)
    torch.manual_seed(0)
    student = build_student(preset="nano", config_file=None, init_from=None, vocab_size=VOCAB, max_positions=1024,
                            eos_token_id=data.eos_token_id)
    head = linear_head(student, torch.arange(8)[None])
    rows = default_chunk_rows(VOCAB, head.weight.shape[1], "cpu")
    assert head is not None and 24 * (SEQ_LEN - 1) > rows  # one eval batch's rows take several chunks
    made = []
    head.register_forward_hook(lambda module, inputs, output: made.append(output.shape[:-1].numel()))
    cpu = torch.device("cpu")
    plain = evaluate(student, data, make_loss(settings, data.manifest, 0.0), cpu, nullcontext())
    assert max(made) == 24 * SEQ_LEN  # the plain path's [B, T, V] logits: what the check below would catch
    made.clear()
    chunked = evaluate(student, data, make_loss(settings, data.manifest, 0.0, head), cpu, nullcontext(), head=head)
    assert made and max(made) <= rows
    assert chunked.keys() == plain.keys() and chunked["tokens"] == plain["tokens"] == 48 * (SEQ_LEN - 1)
    for key in ("lm_loss", "kd_loss", "ece", "top1_agreement"):
        assert chunked[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key


def test_a_short_eval_cache_is_noted(world, tmp_path, caplog):
    caplog.set_level("INFO", logger="logitcache")
    run_train(_small(tmp_path, cache=world.caches["topk"], loss="kl", eval_cache=world.caches["topk"], steps=1,
                     eval_every=1, eval_windows=100_000))
    assert "has " in caplog.text and "fewer than --eval-windows 100000: evaluating on those" in caplog.text


def test_settings_are_checked_before_any_work(tmp_path):
    cases = [
        (dict(), "--cache"),
        (dict(cache=tmp_path, corpus=tmp_path), "not both"),
        (dict(cache=tmp_path), "--loss"),
        (dict(corpus=tmp_path, tokenizer=tmp_path, loss="kl"), "needs a teacher"),
        (dict(cache=tmp_path, loss="nope"), "unknown loss"),
        (dict(cache=tmp_path, loss="kl", student=None), "exactly one"),
        (dict(cache=tmp_path, loss="kl", student="huge"), "choose one of"),
        (dict(cache=tmp_path, loss="kl", skew=0.2), "--skew goes with --loss skew-kl or skew-reverse-kl, not --loss kl"),
        (dict(corpus=tmp_path, tokenizer=tmp_path, loss_k=4), "--loss-k goes with --loss bild or rlkd, not --loss ce"),
        (dict(cache=tmp_path, loss="bild", rlkd_base="kl"), "--rlkd-base goes with --loss rlkd"),
        (dict(cache=tmp_path, loss="skew-kl", skew=1.5), "strictly between 0 and 1"),
        (dict(cache=tmp_path, loss="bild", loss_k=0), "k=0 must be > 0"),
        (dict(cache=tmp_path, loss="rlkd", rank_temperature=-1.0), "rank_temperature=-1.0 must be > 0"),
        (dict(cache=tmp_path, loss="rlkd", rlkd_base="nope"), "unknown rlkd base loss 'nope'"),
        (dict(cache=tmp_path, loss="topk-ghost", temperature=2.0), "topk-ghost has no temperature"),
        (dict(cache=tmp_path, loss="kl", warmup_steps=8), "--warmup-steps 8: must be >= 0 and below --steps 8"),
    ]
    for options, message in cases:
        with pytest.raises(LogitcacheError, match=message):
            _small(tmp_path / "out", **options).check()
    (tmp_path / "a-file").touch()
    with pytest.raises(LogitcacheError, match="a-file is a file; give a folder"):
        _small(tmp_path / "a-file", cache=tmp_path, loss="kl").check()


def test_eval_kd_loss_reads_the_eval_cache_by_its_own_build(world, tmp_path):
    with pytest.raises(LogitcacheError, match=f"needs a cache built with --method sample; --eval-cache {world.caches['topk']} is topk"):
        run_train(_small(tmp_path, cache=world.caches["sample"], loss="rs-kd", eval_cache=world.caches["topk"], steps=1))


def test_a_loss_that_does_not_suit_the_cache_fails_before_anything_starts(world, tmp_path):
    result = processes.run(_cli(tmp_path / "out", world.caches["topk"]), env=SUBPROCESS_ENV | {"LOGITCACHE_DEBUG": ""})
    output = (result.stdout + result.stderr).replace("\n", "")
    assert result.returncode == 1
    assert f"--loss rs-kd needs a cache built with --method sample; --cache {world.caches['topk']} is topk" in output
    assert output.startswith("error:")  # no progress bar drawn first
    assert not (tmp_path / "out").exists()


def test_a_missing_tokenizer_folder_is_named(world, tmp_path):
    with pytest.raises(LogitcacheError, match="cannot load a tokenizer from .*no-such-dir: there is no such folder"):
        run_train(_small(tmp_path, corpus=world.root / "corpus.jsonl", tokenizer=tmp_path / "no-such-dir", seq_len=SEQ_LEN))


def test_resume_compares_what_the_settings_mean_not_how_they_are_spelled(tmp_path, monkeypatch):
    from logitcache.train.checkpoint import _check_resumable, resumed

    monkeypatch.chdir(tmp_path)
    saved = _small(Path("out"), cache=Path("cache"), loss="bild").to_json()
    _check_resumable(saved, _small(tmp_path / "out", cache=tmp_path / "." / "cache", loss="bild", temperature=3.0))
    with pytest.raises(LogitcacheError, match="temperature=3.0 but this run has temperature=2.0"):
        _check_resumable(saved, _small(Path("out"), cache=Path("cache"), loss="bild", temperature=2.0))
    with pytest.raises(LogitcacheError, match="cache="):
        _check_resumable(saved, _small(Path("out"), cache=Path("other"), loss="bild"))
    # the default warmup is what it resolves to: a checkpoint saved with it spelled out resumes without it
    spelled = _small(Path("out"), cache=Path("cache"), loss="bild", steps=50, warmup_steps=5).to_json()
    _check_resumable(spelled, _small(Path("out"), cache=Path("cache"), loss="bild", steps=50, warmup_steps=None))
    with pytest.raises(LogitcacheError, match="warmup_steps=6 but this run has warmup_steps=5"):
        _check_resumable({**spelled, "warmup_steps": 6}, _small(Path("out"), cache=Path("cache"), loss="bild", steps=50,
                                                                warmup_steps=5))
    # not given: the checkpoint's, even one from before the default (100) became a tenth of a short run
    old = {**spelled, "warmup_steps": 100}
    unspecified = _small(Path("out"), cache=Path("cache"), loss="bild", steps=50, warmup_steps=None)
    _check_resumable(old, unspecified)
    assert resumed(unspecified, old).warmup == 100 and resumed(unspecified, spelled).warmup == 5
    assert resumed(replace(unspecified, warmup_steps=3), old).warmup == 3


@pytest.mark.parametrize("loss, options, keywords", [
    ("bild", dict(loss_k=2, temperature=2.0), dict(k=2, temperature=2.0)),
    ("rlkd", dict(loss_k=3, rank_temperature=0.5, rlkd_base="topk-ghost"), dict(k=3, rank_temperature=0.5, base="topk-ghost")),
    ("skew-reverse-kl", dict(skew=0.4), dict(skew=0.4)),
])
def test_loss_options_reach_the_loss(world, tmp_path, loss, options, keywords):
    from logitcache.loader.collate import collate
    from logitcache.loader.dataset import CacheDataset
    from logitcache.losses.sparse import get_loss
    from logitcache.train.objective import make_loss

    settings = _small(tmp_path, cache=world.caches["topk"], loss=loss, **options)
    settings.check()
    dataset = CacheDataset(world.caches["topk"], seed=0, global_batch_size=4)
    batch = collate(list(itertools.islice(dataset, 4)), dataset.manifest)
    logits = torch.randn(4, SEQ_LEN - 1, VOCAB, generator=torch.Generator().manual_seed(0)) * 3
    bound = make_loss(settings, dataset.manifest, 0.0)(logits, batch).total
    assert bound == get_loss(loss)(logits, batch, **keywords).total
    assert bound != get_loss(loss)(logits, batch).total  # the options change the value, so the check can fail


def test_default_warmup_is_a_tenth_of_a_short_run():
    assert [TrainSettings(out=Path("o"), steps=n).warmup for n in (1, 50, 999, 1000, 5000)] == [0, 5, 99, 100, 100]
    assert TrainSettings(out=Path("o"), steps=50, warmup_steps=7).warmup == 7


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_floor():
    factors = [lr_factor(s, warmup_steps=4, steps=104, min_lr_ratio=0.1) for s in range(104)]
    assert factors[:5] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert factors[54] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_ece_of_equal_width_bins():
    confidence = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.3, 0.3])
    correct = torch.tensor([True, True, True, False, False, True])
    stats = calibration_bins(confidence, correct)
    assert stats.shape == (3, ECE_BINS) and stats[0].sum() == 6
    # bins: 4 at 0.95 with accuracy 0.75 -> |0.75 - 0.95| * 4/6; 2 at 0.3 with accuracy 0.5 -> 0.2 * 2/6
    assert expected_calibration_error(stats) == pytest.approx(0.2 * 4 / 6 + 0.2 * 2 / 6)
    assert expected_calibration_error(calibration_bins(torch.tensor([1.0, 0.0]), torch.tensor([True, False]))) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kd_on_cuda_with_bf16_autocast_and_compile(world, tmp_path):
    from transformers import AutoModelForCausalLM

    records = []
    run_train(_small(tmp_path, cache=world.caches["topk"], loss="kl", temperature=2.0, grad_accum=2, compile=True,
                     device="cuda"), on_step=records.append)
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student", local_files_only=True)
    assert next(student.parameters()).dtype == torch.float32


def test_an_error_found_after_the_checks_is_still_one_line(world, tmp_path):
    # Found while opening the data (inside the progress bar's block): no spinner line before it.
    env = {k: v for k, v in SUBPROCESS_ENV.items() if k != "LOGITCACHE_DEBUG"}
    done = processes.run(_cli(tmp_path / "out", world.caches["sample"], "--eval-windows", "100000"), cwd=REPO, env=env)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --eval-windows 100000 holds out"), done.stderr
