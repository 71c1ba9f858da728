"""``logitcache train`` on several processes: real ``torchrun --nproc-per-node 2`` runs on CPU (gloo).

Every distributed run is checked against ``run_train`` on one process with the same global batch
(``--batch-size`` doubled, ``--lanes 2`` for the same data order): the same windows, the same
losses and gradient norms within float tolerance (only the order of sums differs), and a
checkpoint of two processes resumes on one. Runs are tiny (nano student, 32 tokens, 12 steps) on
the sampled cache of conftest.py (and its corpus, for cross-entropy from text).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import processes
import pytest
import torch

from logitcache.errors import LogitcacheError
from logitcache.train.distributed import World, check_global_batch
from logitcache.train.evaluate import eval_share
from logitcache.train.loop import DEBUG_SEQUENCES_ENV, run_train
from logitcache.train.metrics import read_metrics
from logitcache.train.settings import TrainSettings

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LOGITCACHE_DEBUG": "1", "HF_HUB_OFFLINE": "1"}
PROCESSES = 2
STEPS = 12
# One setting for every run; a process takes batch_size x grad_accum windows of each global batch.
OPTIONS = dict(student="nano", steps=STEPS, grad_accum=2, lr=3e-3, warmup_steps=2, eval_every=4,
               eval_windows=6, save_every=2, seed=1, device="cpu")
PER_PROCESS = dict(batch_size=2)  # x 2 processes x grad_accum 2 = global batch 8
ONE_PROCESS = dict(batch_size=4, lanes=PROCESSES)  # the same 8 windows in the same order
TIMEOUT = 300


def _flags(options: dict) -> list[str]:
    """CLI flags of TrainSettings fields: ``True`` a bare flag, ``None`` and ``False`` left out."""
    flags = []
    for name, value in options.items():
        if value is not None and value is not False:
            flags += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flags


def _distil(cache: Path) -> dict:
    return dict(cache=cache, loss="rs-kd")


def _torchrun(out: Path, **options) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(PROCESSES),
            "-m", "logitcache", "train", "--out", str(out), *_flags({**OPTIONS, **PER_PROCESS, **options})]


def _one_process(out: Path, **options) -> TrainSettings:
    return TrainSettings(out=out, **{**OPTIONS, **ONE_PROCESS, **options})


def _sequences(folder: Path, name: str) -> list[list[int]]:
    """Sequence ids per step from a trace file of :data:`DEBUG_SEQUENCES_ENV`, in step order."""
    records = [json.loads(line) for line in (folder / name).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return [r["sequence_ids"] for r in records]


def _kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def _assert_same_run(records: list[dict], expected: list[dict], rel: float = 1e-5) -> None:
    """The same steps and evals, each number within ``rel``: only the order of float sums may differ."""
    assert [(r["kind"], r["step"]) for r in records] == [(r["kind"], r["step"]) for r in expected]
    for got, want in zip(records, expected):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value, rel=rel, abs=1e-9) if isinstance(value, float) else value), (got, key)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, sample_cache) -> SimpleNamespace:
    """An uninterrupted two-process run and the one-process run with the same global batch, both traced."""
    root = tmp_path_factory.mktemp("distributed")
    traces = {name: root / f"trace-{name}" for name in ("ddp", "one")}
    for folder in traces.values():
        folder.mkdir()
    ddp = processes.run(_torchrun(root / "ddp", **_distil(sample_cache)), cwd=REPO,
                        env={**ENV, DEBUG_SEQUENCES_ENV: str(traces["ddp"])}, timeout=TIMEOUT)
    assert ddp.returncode == 0, ddp.stderr[-5000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(DEBUG_SEQUENCES_ENV, str(traces["one"]))
        run_train(_one_process(root / "one", **_distil(sample_cache)))
    return SimpleNamespace(cache=sample_cache, traces=traces, ddp=root / "ddp", one=root / "one")


def test_two_processes_complete_and_process_0_alone_writes_the_files(runs):
    from transformers import AutoModelForCausalLM

    assert sorted(path.name for path in runs.ddp.iterdir()) == ["checkpoint", "loss.png", "metrics.jsonl", "student"]
    records = read_metrics(runs.ddp / "metrics.jsonl")
    assert [r["step"] for r in _kind(records, "train")] == list(range(1, STEPS + 1))  # each step once: one writer
    assert [r["step"] for r in _kind(records, "eval")] == [4, 8, 12]
    assert all(r["tokens"] == 8 * 31 for r in _kind(records, "train"))  # the global batch's positions
    trainer = torch.load(runs.ddp / "checkpoint" / "trainer.pt", weights_only=True)
    assert trainer["step"] == STEPS and trainer["world_size"] == PROCESSES and trainer["data"]["lanes"] == PROCESSES
    student = AutoModelForCausalLM.from_pretrained(runs.ddp / "student", local_files_only=True)
    reference = AutoModelForCausalLM.from_pretrained(runs.one / "student", local_files_only=True)
    # Adam turns near-zero gradients into steps of about lr, so the order of float sums can move a
    # weight by a few 1e-6 over the run (the losses above agree to 1e-5 relative).
    for weight, expected in zip(student.state_dict().values(), reference.state_dict().values()):
        torch.testing.assert_close(weight, expected, rtol=1e-4, atol=5e-5)


def test_processes_take_disjoint_halves_of_the_one_process_batches(runs):
    ranks = [_sequences(runs.traces["ddp"], f"rank-{r}.jsonl") for r in range(PROCESSES)]
    one = _sequences(runs.traces["one"], "rank-0.jsonl")
    for step, (first, second, whole) in enumerate(zip(*ranks, one), start=1):
        assert len(first) == len(second) == 4 and not set(first) & set(second), step
        assert first + second == whole, step  # process r takes columns [4r, 4r + 4) of the global batch
    assert len({s for batch in one for s in batch}) > 8  # the steps do read different windows


def test_losses_match_one_process_with_the_same_global_batch(runs):
    # grad_norm is before clipping: had DDP's averaging over processes not been undone it would be half.
    _assert_same_run(read_metrics(runs.ddp / "metrics.jsonl"), read_metrics(runs.one / "metrics.jsonl"))


def _interrupted(out: Path, **options) -> None:
    """A two-process run stopped (SIGTERM to torchrun, which stops its workers) after its first checkpoint."""
    log = out.parent / "torchrun.log"
    with open(log, "w") as stderr, processes.tracked(_torchrun(out, **options), cwd=REPO, env=ENV, stdout=stderr,
                                                     stderr=stderr) as process:
        deadline = time.monotonic() + TIMEOUT
        while not (out / "checkpoint" / "trainer.pt").is_file() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)  # leaving the block kills whatever is left, torchrun's workers too
    assert process.returncode != 0, log.read_text()[-5000:]  # stopped, not finished
    assert not (out / "student").exists() and len(_kind(read_metrics(out / "metrics.jsonl"), "train")) < STEPS


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_on_one_process(runs, tmp_path, fsdp):
    """DDP, and FSDP2 (fully_shard works on CPU with gloo): the run continues with the uninterrupted losses.

    An FSDP checkpoint holds the whole optimizer state, so one process (where --fsdp shards nothing) loads it.
    """
    extra = dict(_distil(runs.cache), fsdp=fsdp)
    out = tmp_path / "run"
    _interrupted(out, **extra)
    before = read_metrics(out / "metrics.jsonl")
    saved = torch.load(out / "checkpoint" / "trainer.pt", weights_only=True)["step"]
    expected = read_metrics(runs.ddp / "metrics.jsonl")
    _assert_same_run(before, expected[: len(before)])  # the two processes, DDP or FSDP, up to the stop

    run_train(_one_process(out, **extra, lanes=None, resume=True))  # lanes come from the checkpoint
    records = read_metrics(out / "metrics.jsonl")
    _assert_same_run(records, expected)
    assert any(r["step"] > saved for r in records) and saved < STEPS


def test_a_resume_must_keep_the_global_batch(runs):
    with pytest.raises(LogitcacheError, match=r"8 windows .* 2 x --grad-accum 2 x 1 processes = 4; .* e\.g\. --batch-size 4 --grad-accum 2"):
        run_train(_one_process(runs.ddp, **_distil(runs.cache), batch_size=2, lanes=None, resume=True))
    checkpoint = {"data": {"global_batch_size": 8}}
    with pytest.raises(LogitcacheError, match="8 windows do not split over 3 processes"):
        check_global_batch(_one_process(runs.ddp, batch_size=1, grad_accum=1), World(rank=0, size=3), checkpoint)
    check_global_batch(_one_process(runs.ddp, batch_size=1, grad_accum=1), World(rank=0, size=8), checkpoint)


@pytest.mark.parametrize("batches, size", [(3, 2), (4, 2), (1, 3), (5, 4)])
def test_eval_batches_split_over_processes_with_equal_forward_counts(batches, size):
    items = [{"id": torch.tensor(i)} for i in range(batches)]
    shares = [eval_share(items, World(rank=r, size=size)) for r in range(size)]
    assert len({len(share) for share in shares}) == 1  # the same number of forwards everywhere (FSDP)
    counted = sorted(int(batch["id"]) for share in shares for batch, counts in share if counts)
    assert counted == list(range(batches))  # each batch counted exactly once


def test_cross_entropy_from_text_on_two_processes_matches_one_process(tmp_path, corpus_file, teacher_dir):
    text = dict(corpus=corpus_file, tokenizer=teacher_dir, seq_len=32, steps=4, eval_every=2, eval_windows=5)
    done = processes.run(_torchrun(tmp_path / "two", **text), cwd=REPO, env=ENV, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-5000:]
    run_train(_one_process(tmp_path / "one", **text))
    _assert_same_run(read_metrics(tmp_path / "two" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl"))
