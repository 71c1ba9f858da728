"""``logitcache rounds`` (logitcache/rounds/): two on-policy rounds end to end with off-policy records mixed
in, each round's cache naming the student that answered; a real process killed in round 1 and rerun ends
with the weights of an uninterrupted run, bit for bit; other settings refused; bad input one clear line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import processes
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_chat import CHAT, TEMPLATE

from logitcache.cache.manifest import read_manifest
from logitcache.errors import LogitcacheError
from logitcache.rounds.run import off_policy_order, round_prompt_order, run_rounds
from logitcache.rounds.settings import RoundsSettings
from logitcache.teacher.folder import weights_fingerprint

QUESTIONS = ["What is 2 + 3?", "Reverse: apple river", "Hi", "Sort: 3 1 2", "Count the a in banana", "Shout: quiet"]
ANSWERS = ["5", "river apple", "Hello there", "1 2 3", "3", "QUIET"]


def _chats(path: Path, with_answers: bool) -> Path:
    chats = [[CHAT[0], {"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if with_answers else [])
             for q, a in zip(QUESTIONS, ANSWERS)]
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in chats))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rounds-inputs")
    (folder / "chat.jinja").write_text(TEMPLATE)
    return {"prompts": _chats(folder / "prompts.jsonl", with_answers=False),
            "references": _chats(folder / "references.jsonl", with_answers=True), "template": folder / "chat.jinja"}


def _settings(teacher_dir: Path, inputs: dict[str, Path], out: Path, **overrides) -> RoundsSettings:
    """Two small rounds of the test teacher distilling a copy of itself: 4 of the 6 prompts each, half the
    examples off-policy, GKD's JSD on a sampled cache, checkpoints every step, scored on the references."""
    settings = dict(
        teacher=teacher_dir, student=teacher_dir, prompts=inputs["prompts"], out=out, loss="gkd-jsd",
        loss_option=("jsd-beta=0.5",), rounds=2, steps=3, prompts_per_round=4, max_new_tokens=6, generate_batch_size=2,
        off_policy_fraction=0.5, off_policy_data=inputs["references"], method="sample", samples=8, seq_len=128,
        build_batch_size=4, batch_size=2, save_every=1, chat_template=inputs["template"],
        eval_prompts=inputs["references"], device="cpu", seed=3,
    )
    return RoundsSettings(**{**settings, **overrides})


def _cli_args(settings: RoundsSettings) -> list[str]:
    """The CLI options that give ``settings`` (those :func:`_settings` sets)."""
    args = []
    for name in ("teacher", "student", "prompts", "out", "loss", "rounds", "steps", "prompts_per_round", "max_new_tokens",
                 "generate_batch_size", "off_policy_fraction", "off_policy_data", "method", "samples", "seq_len",
                 "build_batch_size", "batch_size", "save_every", "chat_template", "eval_prompts", "device", "seed"):
        args += [f"--{name.replace('_', '-')}", str(getattr(settings, name))]
    for option in settings.loss_option:
        args += ["--loss-option", option]
    return args


@pytest.fixture(scope="module")
def two_rounds(teacher_dir, inputs, tmp_path_factory) -> tuple[RoundsSettings, list[dict]]:
    settings = _settings(teacher_dir, inputs, tmp_path_factory.mktemp("rounds") / "out")
    return settings, run_rounds(settings)


def _final_weights(out: Path, round_index: int) -> dict[str, torch.Tensor]:
    return load_file(out / f"round-{round_index}" / "student" / "student" / "model.safetensors")


def test_prompt_and_off_policy_orders_are_seeded_permutations_wrapping():
    rounds = [round_prompt_order(6, 4, seed=3, round_index=r) for r in range(3)]
    assert sorted(rounds[0] + rounds[1][:2]) == list(range(6))  # every prompt once before any twice
    assert rounds[1][2:] == rounds[0][:2] and rounds[2] == rounds[0][2:] + rounds[1][:2]  # wrapping around
    assert rounds == [round_prompt_order(6, 4, 3, r) for r in range(3)] != [round_prompt_order(6, 4, 4, r) for r in range(3)]
    assert round_prompt_order(6, None, 3, 0) == round_prompt_order(6, None, 3, 1) and len(round_prompt_order(6, None, 3, 0)) == 6
    picks = off_policy_order(4, 6, seed=3, round_index=1)
    assert sorted(picks[:4]) == [0, 1, 2, 3] and picks[4:] == picks[:2] and picks != off_policy_order(4, 6, 3, 2)


def test_two_rounds_write_their_files_and_each_cache_names_its_student(two_rounds, teacher_dir, inputs):
    settings, records = two_rounds
    out = settings.out
    assert [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()] == records
    for r, record in enumerate(records):
        folder = out / f"round-{r}"
        started = teacher_dir if r == 0 else out / "round-0" / "student" / "student"
        assert json.loads((folder / "metrics.json").read_text()) == record
        assert record["round"] == r and record["started_from"] == str(started)
        # generated by the round's student, with the round's seed
        generated_by = read_manifest(folder / "cache")["corpus"]["generated_by"]
        assert generated_by == {"model": str(started.resolve()), "model_fingerprint": weights_fingerprint(started),
                                "temperature": 1.0, "top_p": 1.0, "seed": settings.seed + r, "max_new_tokens": 6}
        # trained from the round's student, to its steps
        checkpoint = json.loads((folder / "student" / "checkpoint" / "settings.json").read_text())
        assert Path(checkpoint["init_from"]) == started and checkpoint["jsd_beta"] == 0.5
        assert record["train_steps"] == 3 and math.isfinite(record["train_loss"])
        # the round's prompts, references left out; half the examples off-policy, marked
        round_prompts = [json.loads(line) for line in (folder / "prompts.jsonl").read_text().splitlines()]
        assert [p["index"] for p in round_prompts] == round_prompt_order(6, 4, settings.seed, r)
        assert all(p["messages"][-1]["role"] == "user" for p in round_prompts)
        mixed = [json.loads(line) for line in (folder / "mixed.jsonl").read_text().splitlines()]
        on, off = [m for m in mixed if not m["off_policy"]], [m for m in mixed if m["off_policy"]]
        assert record["prompts"] == 4 and record["generated"] + record["empty"] == 4 and len(on) == record["generated"]
        assert len(off) == record["off_policy"] == record["generated"] and record["examples"] == len(mixed)
        assert all("response_logprobs" in m for m in on) and all(m["messages"][-1]["content"] == ANSWERS[m["index"]] for m in off)
        assert set(record["seconds"]) == {"generate", "mix", "build", "train", "evaluate", "round"}
        assert math.isclose(sum(record["fractions"].values()), 1.0)
        assert 0 <= record["eval_exact_match"] <= 1 and 0 <= record["eval_rouge_l"] <= 1
    round_0, round_1 = _final_weights(out, 0), _final_weights(out, 1)
    assert any(not torch.equal(round_0[name], round_1[name]) for name in round_0)  # round 1 trained on


@pytest.mark.parametrize(("loss", "method", "format"), [("rs-kd", "sample", "chat"), ("reverse-kl", "topk", "prompt-response")])
def test_one_round_without_mixing(teacher_dir, inputs, tmp_path, loss, method, format):
    """Other losses and methods, prompt-response records: the cache is generate's output itself."""
    prompts = inputs["prompts"]
    if format == "prompt-response":
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    settings = _settings(teacher_dir, inputs, tmp_path / "out", prompts=prompts, loss=loss, loss_option=(), method=method,
                         k=4, format=format, chat_template=inputs["template"] if format == "chat" else None, rounds=1,
                         prompts_per_round=None, off_policy_fraction=0.0, off_policy_data=None, eval_prompts=None)
    [record] = run_rounds(settings)
    manifest = read_manifest(settings.out / "round-0" / "cache")
    assert manifest["method"] == method and manifest["corpus"]["generated_by"]["model"] == str(teacher_dir.resolve())
    assert manifest["corpus"]["description"].endswith(str(settings.out / "round-0" / "generated.jsonl"))
    assert record["prompts"] == 6 and record["off_policy"] == 0 and record["examples"] == record["generated"]
    assert set(record["seconds"]) == {"generate", "build", "train", "round"} and math.isfinite(record["train_loss"])
    assert not (settings.out / "round-0" / "mixed.jsonl").exists()
    # a larger --rounds continues: round 1 answers with round 0's student
    assert run_rounds(replace(settings, rounds=2))[0] == record
    manifest = read_manifest(settings.out / "round-1" / "cache")
    assert manifest["corpus"]["generated_by"]["model"] == str((settings.out / "round-0" / "student" / "student").resolve())


def test_a_finished_run_is_not_redone_and_other_settings_are_refused(two_rounds):
    settings, records = two_rounds
    rewritten = ("rounds.json", "rounds.jsonl")  # the settings of this run, every round's metrics
    before = {p: p.stat().st_mtime_ns for p in settings.out.rglob("*") if p.is_file() and p.name not in rewritten}
    assert run_rounds(replace(settings, generate_batch_size=3)) == records  # a batch size changes nothing computed
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(LogitcacheError, match=r"holds rounds run with other settings \(lr, seed\); rerun with those"):
        run_rounds(replace(settings, lr=1e-3, seed=4))


@pytest.mark.parametrize(("kill_at", "stage"), [("generated.jsonl", "generate"), ("student/checkpoint/trainer.pt", "train")])
def test_a_killed_run_continues_to_the_weights_of_an_uninterrupted_one(two_rounds, tmp_path, kill_at, stage):
    """Killed once round 1's generation has begun, or its training has saved a checkpoint."""
    reference, _ = two_rounds
    settings = replace(reference, out=tmp_path / "out")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "logitcache", "rounds", *_cli_args(settings)]
    with processes.tracked(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env) as proc:
        deadline = time.monotonic() + 300
        while not (settings.out / "round-1" / kill_at).exists():
            assert proc.poll() is None and time.monotonic() < deadline, "rounds ended before round 1 could be killed"
            time.sleep(0.01)
        proc.kill()
        proc.wait()
    assert (settings.out / "round-0" / "metrics.json").is_file()
    finished = settings.out / "round-1" / "stages.json"
    assert stage not in (json.loads(finished.read_text()) if finished.is_file() else {}), f"round 1's {stage} ended first"
    round_0_done = (settings.out / "round-0" / "metrics.json").stat().st_mtime_ns
    result = run_cli("rounds", *_cli_args(settings))
    assert result.returncode == 0, result.stderr
    assert (settings.out / "round-0" / "metrics.json").stat().st_mtime_ns == round_0_done
    for r in (0, 1):
        ours, theirs = _final_weights(settings.out, r), _final_weights(reference.out, r)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), f"round {r}"


@pytest.mark.parametrize(("change", "message"), [
    (dict(off_policy_fraction=1.0), r"--off-policy-fraction 1.0: must lie in \[0, 1\)"),
    (dict(off_policy_data=None), "--off-policy-fraction above 0 and --off-policy-data FILE go together"),
    (dict(loss="forward", loss_option=()), "unknown loss 'forward'; choose one of"),
    (dict(loss="reverse-kl"), "--loss-option jsd-beta goes with --loss gkd-jsd, not --loss reverse-kl"),
    (dict(loss_option=("beta:0.5",)), "write NAME=VALUE with NAME one of"),
    (dict(loss_option=("jsd-beta=half",)), "'half' is not a float"),
    (dict(loss="rs-kd", loss_option=(), method="topk"), "--loss rs-kd needs a cache built with --method sample"),
    (dict(loss="minillm", loss_option=(), temperature=0.7), "drawn at temperature 0.7 and top-p 1.0: their recorded"),
    (dict(loss="minillm", loss_option=(), top_p=0.9), "drawn at temperature 1.0 and top-p 0.9"),
    (dict(rounds=0), "--rounds 0: must be at least 1"),
    (dict(prompts_per_round=0), "--prompts-per-round 0: must be at least 1"),
    (dict(lr=-1.0), "--lr -1.0: must be positive"),
    (dict(method="dense"), "--method 'dense': choose one of"),
    (dict(temperature=-1.0), "--temperature -1.0: must be >= 0"),
    (dict(prompts=Path("nope.jsonl")), "--prompts nope.jsonl: no such file"),
])
def test_bad_settings_are_refused_before_anything_is_written(teacher_dir, inputs, tmp_path, change, message):
    with pytest.raises(LogitcacheError, match=message):
        run_rounds(_settings(teacher_dir, inputs, tmp_path / "out", **change))
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_clear_line(teacher_dir, inputs, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    cases = {
        "off-policy records need answers": (dict(off_policy_data=inputs["prompts"]), "has no reference answer"),
        "a foreign --out": (dict(out=tmp_path / "out"), "holds files that are not `logitcache rounds` output"),
    }
    for what, (change, message) in cases.items():
        settings = replace(_settings(teacher_dir, inputs, tmp_path / "fresh"), **change)
        result = run_cli("rounds", *_cli_args(settings))
        assert result.returncode == 1, what
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (what, result.stderr)
    assert not (tmp_path / "fresh").exists() and [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def test_minillm_rounds_importance_weight_the_generated_rows_only(teacher_dir, inputs, tmp_path):
    """With off-policy records mixed in, the round's cache keeps the sampling log-probabilities of the generated
    answers and NaN for the teacher-forced ones, and MiniLLM's loss trains on both (policy gradient on the first)."""
    from conftest import all_targets

    settings = _settings(teacher_dir, inputs, tmp_path / "out", loss="minillm", loss_option=("pg-clip=0.3",),
                         method="topk", k=4, rounds=1, eval_prompts=None)
    [record] = run_rounds(settings)
    assert math.isfinite(record["train_loss"]) and record["off_policy"] > 0
    mixed = [json.loads(line) for line in (settings.out / "round-0" / "mixed.jsonl").read_text().splitlines()]
    stored = all_targets(settings.out / "round-0" / "cache")
    for row, example in enumerate(mixed):
        targets = stored.target_lengths[row] > 0
        behavior = stored.behavior_logprob[row][targets]
        assert np.isnan(behavior).all() if example["off_policy"] else np.isfinite(behavior).all(), row
