"""Reproduce MiniLLM's comparison (Gu et al., arXiv 2306.08543) offline, in rounds, at a small size.

MiniLLM distils on the student's own samples with reverse KL (a policy gradient) and reports that it beats
forward KD on instruction following. Its teacher scores the samples online; here the teacher runs offline,
once per round (``logitcache rounds``: the student answers, ``build`` scores the answers, ``train`` learns
from them). Everything shares the task set, tokenizer and teacher of ``examples/reproduce_bild.py``:

1. tasks, tokenizer, teacher: as ``reproduce_bild.py`` makes them (or taken from an earlier run's folder
   with ``--teacher-from``), and a top-k 32 cache of the teacher on the training chats (reference answers,
   teacher-forced);
2. per seed, one SFT student (CE on the answers, ``--sft-steps``) that every method below starts from, with
   the same number of further steps (``--kd-steps``), batch size and learning rate:
   - forward KD: ``kl`` on the top-k 32 cache of the reference answers (off-policy, teacher-forced);
   - on-policy rounds with ``minillm`` (MiniLLM's policy gradient: single-step reverse KL on the cached ids
     plus the length-normalised long-term term, importance-weighted against the sampling log-probabilities);
   - on-policy rounds with ``reverse-kl`` (token-level reverse KL on the cached ids: the single-step term
     alone), to see what the long-term policy gradient adds;
   - on-policy rounds with ``minillm`` where half of each round's examples are training chats with their
     reference answers (``--off-policy-fraction 0.5``: the single-step term alone on those);
   each round (``--rounds``, ``--kd-steps / --rounds`` steps each) answers ``--prompts-per-round`` training
   prompts at temperature 1 and caches the answers with the teacher (top-k 32);
3. scores on the held-out prompts: exact match and ROUGE-L of greedy answers, the LM loss of the reference
   answers' tokens, and the reverse KL to the teacher on fresh samples of the student's own
   (``--fresh-samples`` answers per held-out prompt at temperature 1, scored by the teacher with ``build``:
   the mean over the sampled tokens of ``log q(y_t) - log p(y_t)``, in nats per token, where ``log q`` is
   what ``generate`` records and ``log p`` the cache's ``gold_logprob``).

The tables go to stdout, ``OUT/results.md`` and ``OUT/results.json``; examples/REPRODUCE_MINILLM.md has the
figures of a full run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import read_shard
from logitcache.cache.manifest import read_manifest
from logitcache.demo import make_model
from logitcache.errors import LogitcacheError
from logitcache.generate.run import run_generate
from logitcache.generate.settings import GenerateSettings
from logitcache.rounds.run import RoundFolder, run_rounds
from logitcache.rounds.settings import RoundsSettings
from logitcache.train.checkpoint import STUDENT_NAME
from logitcache.train.loop import run_train
from logitcache.train.settings import TrainSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))  # reproduce_bild.py and tasks.py, beside this script
from reproduce_bild import (  # noqa: E402
    add_task_arguments,
    build,
    check_task_arguments,
    common_settings,
    context,
    score,
    sft_settings,
    train_teacher,
    write_report,
    write_task_set,
)
from tasks import write_records  # noqa: E402

K = 32  # top-k of every cache the students learn from
@dataclass(frozen=True)
class OnPolicy:
    """An on-policy method: its loss, and the fraction of each round's examples that are teacher-forced."""

    loss: str
    off_policy_fraction: float = 0.0

    @property
    def folder(self) -> str:
        return f"rounds-{self.loss}" + (f"-mixed-{self.off_policy_fraction:g}" if self.off_policy_fraction else "")


ON_POLICY = {
    "on-policy rounds, minillm": OnPolicy("minillm"),
    "on-policy rounds, token-level reverse KL": OnPolicy("reverse-kl"),
    "on-policy rounds, minillm, half teacher-forced": OnPolicy("minillm", 0.5),
}
FORWARD_KD = "forward KD (top-k 32 of the reference answers)"
SFT_START = "SFT start"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, default=Path("minillm-out"), help="folder for everything the run makes")
    add("--teacher-from", type=Path, default=None,
        help="take tasks/, tokenizer/, chat.jinja and the teacher from this earlier run's folder (reproduce_bild.py or "
             "this script, same task settings) instead of making them")
    add_task_arguments(add)
    add("--sft-steps", type=int, default=500, help="SFT steps of the student every method starts from")
    add("--kd-steps", type=int, default=300, help="distillation steps of every method after SFT")
    add("--rounds", type=int, default=3, help="on-policy rounds (each --kd-steps / --rounds steps)")
    add("--prompts-per-round", type=int, default=1600, help="training prompts the student answers each round")
    add("--fresh-samples", type=int, default=2, help="sampled answers per held-out prompt for the reverse KL")
    args = parser.parse_args(argv)
    check_task_arguments(parser, args)
    if args.kd_steps % args.rounds:
        parser.error(f"--kd-steps {args.kd_steps} must be a multiple of --rounds {args.rounds}")
    return args


# ---- the shared parts ---------------------------------------------------------------------


def shared_teacher(args: argparse.Namespace) -> Path:
    """The task set, tokenizer, chat template and teacher: made, or copied from ``--teacher-from``."""
    train = write_task_set(args)
    if args.teacher_from is None:
        return train_teacher(args, train)
    source = args.teacher_from
    for name in ("tasks/train.jsonl", "tasks/held_out.jsonl", "chat.jinja"):
        if not (source / name).is_file() or (source / name).read_bytes() != (args.out / name).read_bytes():
            raise LogitcacheError(f"--teacher-from {source}: its {name} is not the one these task settings make")
    shutil.copytree(source / "tokenizer", args.out / "tokenizer")
    teacher = args.out / "teacher"
    shutil.copytree(source / "teacher-run" / STUDENT_NAME, teacher)
    return teacher


def prompts_file(args: argparse.Namespace, name: str, copies: int) -> Path:
    """``OUT/tasks/NAME-prompts.jsonl``: the held-out records ``copies`` times over (for several samples each)."""
    records = [json.loads(line) for line in (args.out / "tasks" / "held_out.jsonl").read_text().splitlines()]
    path = args.out / "tasks" / f"{name}-prompts.jsonl"
    write_records(path, records * copies)
    return path


# ---- the methods --------------------------------------------------------------------------


def forward_kd(args: argparse.Namespace, cache: Path, sft: Path, seed: int) -> tuple[Path, dict]:
    out = args.out / f"seed-{seed}" / "forward-kd"
    started = time.perf_counter()
    metrics = run_train(TrainSettings(out=out, cache=cache, loss="kl", init_from=sft, **common_settings(args, args.kd_steps, seed)))
    return Path(metrics["student"]), {"train": time.perf_counter() - started}


def on_policy(args: argparse.Namespace, teacher: Path, sft: Path, method: OnPolicy, seed: int) -> tuple[Path, dict]:
    """``logitcache rounds`` from the SFT student; returns the last round's student and the rounds' stage times.
    Teacher-forced records, where mixed in, are training chats with their reference answers."""
    out = args.out / f"seed-{seed}" / method.folder
    train = args.out / "tasks" / "train.jsonl"
    per_round = run_rounds(RoundsSettings(
        teacher=teacher, student=sft, prompts=train, out=out, loss=method.loss,
        off_policy_fraction=method.off_policy_fraction, off_policy_data=train if method.off_policy_fraction else None,
        rounds=args.rounds, steps=args.kd_steps // args.rounds, prompts_per_round=args.prompts_per_round,
        temperature=1.0, max_new_tokens=args.max_new_tokens, generate_batch_size=100, method="topk", k=K,
        seq_len=context(args), build_batch_size=32, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=min(50, args.kd_steps // args.rounds // 10), save_every=0, chat_template=args.out / "chat.jinja",
        device=args.device, seed=seed,
    ))
    stages = {stage: sum(r["seconds"].get(stage) or 0.0 for r in per_round) for stage in ("generate", "build", "train")}
    return RoundFolder.of(out, args.rounds - 1).student, stages


# ---- scores -------------------------------------------------------------------------------


def fresh_reverse_kl(args: argparse.Namespace, model: Path, teacher: Path, out: Path, seed: int) -> float:
    """The student's reverse KL to the teacher on fresh samples of its own, nats per sampled token: the mean of
    ``log q(y_t) - log p(y_t)`` over the tokens of answers drawn at temperature 1 (an unbiased estimate of the
    per-token sequence-level reverse KL), ``log p`` from a teacher build of those answers."""
    generated = out / "fresh.jsonl"
    run_generate(GenerateSettings(
        model=model, prompts=args.out / "tasks" / "fresh-prompts.jsonl", out=generated, chat_template=args.out / "chat.jinja",
        max_new_tokens=args.max_new_tokens, batch_size=100, device=args.device, temperature=1.0, seed=10_000 + seed,
    ))
    cache = out / "fresh-cache"
    run_build(BuildSettings(teacher=teacher, corpus=generated, out=cache, format="chat", chat_template=args.out / "chat.jinja",
                            method="topk", k=8, seq_len=context(args), packing="documents", batch_size=32, seed=0,
                            device=args.device, overwrite=True))
    gap = tokens = 0.0
    for entry in read_manifest(cache)["shards"]:
        targets = read_shard(cache / entry["file"])
        drawn = np.isfinite(targets.behavior_logprob) & (targets.target_lengths > 0)
        gap += float((targets.behavior_logprob[drawn].astype(np.float64) - targets.gold_logprob[drawn]).sum())
        tokens += int(drawn.sum())
    return gap / tokens


def scores(args: argparse.Namespace, model: Path, teacher: Path, held_out_cache: Path, out: Path, seed: int) -> dict:
    return {**score(args, model, held_out_cache), "reverse_kl": fresh_reverse_kl(args, model, teacher, out, seed)}


# ---- report -------------------------------------------------------------------------------

METRICS = (("exact_match", "EM %", 100.0, 1), ("rouge_l", "ROUGE-L", 100.0, 1), ("lm_loss", "LM loss", 1.0, 3),
           ("reverse_kl", "reverse KL", 1.0, 3))


def results_table(teacher: dict, rows: list[dict], seeds: list[int]) -> str:
    """Each metric per seed and its mean, one row per method."""
    header = []
    for _, label, _, _ in METRICS:
        header += [f"{label} s{s}" for s in seeds] + [f"{label} mean"]
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    cells = []
    for key, _, scale, digits in METRICS:
        value = teacher.get(key)
        cells += ["—"] * len(seeds) + ["—" if value is None else f"{scale * value:.{digits}f}"]
    lines.append("| (teacher) | " + " | ".join(cells) + " |")
    for row in rows:
        cells = []
        for key, _, scale, digits in METRICS:
            values = [scale * run[key] for run in row["seeds"]]
            cells += [f"{v:.{digits}f}" for v in values] + [f"{statistics.mean(values):.{digits}f}"]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(rows: list[dict]) -> str:
    """Wall time of each method's distillation by stage, summed over seeds, and each stage's fraction."""
    lines = ["| method | generate s | build s | train s | total s | generate | build | train |", "|---" * 8 + "|"]
    for row in rows:
        if row["name"] == SFT_START:
            continue
        stages = {stage: sum(run["seconds"].get(stage, 0.0) for run in row["seeds"]) for stage in ("generate", "build", "train")}
        total = sum(stages.values())
        lines.append(f"| {row['name']} | " + " | ".join(f"{stages[s]:.0f}" for s in stages) + f" | {total:.0f} | "
                     + " | ".join(f"{100 * stages[s] / total:.0f} %" for s in stages) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    if args.out.exists():
        shutil.rmtree(args.out)  # every run starts afresh: its figures come from one code state
    args.out.mkdir(parents=True)

    print("1. tasks and teacher", flush=True)
    teacher = shared_teacher(args)
    train_cache = build(args, teacher, args.out / "tasks" / "train.jsonl", args.out / "caches" / f"topk-{K}", "chat",
                        {"method": "topk", "k": K})
    held_out_cache = build(args, teacher, args.out / "tasks" / "held_out.jsonl", args.out / "caches" / "held-out", "chat",
                           {"method": "topk", "k": 8})
    prompts_file(args, "fresh", args.fresh_samples)
    teacher_scores = scores(args, teacher, teacher, held_out_cache, args.out / "teacher-scores", 0)
    print(f"   teacher: exact match {100 * teacher_scores['exact_match']:.1f} %, reverse KL to itself "
          f"{teacher_scores['reverse_kl']:.4f} (0 up to the stored precision)", flush=True)

    names = [SFT_START, FORWARD_KD, *ON_POLICY]
    rows = [{"name": name, "seeds": []} for name in names]
    for seed in args.seeds:
        print(f"2. seed {seed}", flush=True)
        folder = args.out / f"seed-{seed}"
        init = folder / "student-init"
        make_model(args.out / "tokenizer", init, preset=args.student_preset, max_positions=context(args), seed=seed)
        sft_start = time.perf_counter()
        sft = Path(run_train(sft_settings(args, folder / "sft", init, args.sft_steps, seed))["student"])
        students = {SFT_START: (sft, {"train": time.perf_counter() - sft_start}),
                    FORWARD_KD: forward_kd(args, train_cache, sft, seed)}
        for name, method in ON_POLICY.items():
            students[name] = on_policy(args, teacher, sft, method, seed)
        for row in rows:
            model, seconds = students[row["name"]]
            run = {"seed": seed, "seconds": seconds, **scores(args, model, teacher, held_out_cache,
                                                               folder / "scores" / row["name"].replace(" ", "-"), seed)}
            row["seeds"].append(run)
            print(f"   {row['name']}: exact match {100 * run['exact_match']:.1f} %, ROUGE-L {100 * run['rouge_l']:.1f}, "
                  f"LM loss {run['lm_loss']:.3f}, reverse KL {run['reverse_kl']:.3f}", flush=True)

    wall = time.monotonic() - started
    sizes = (f"{args.train} training and {args.held_out} held-out prompts, vocabulary {args.vocab}; teacher "
             f"{args.teacher_preset} x {args.teacher_steps} steps{' (from ' + str(args.teacher_from) + ')' if args.teacher_from else ''}; "
             f"students {args.student_preset}: SFT {args.sft_steps} steps, then {args.kd_steps} steps of each method "
             f"({args.rounds} rounds of {args.kd_steps // args.rounds}, {args.prompts_per_round} prompts each); "
             f"{args.batch_size} chats per step; reverse KL on {args.fresh_samples} samples per held-out prompt")
    return write_report(args.out, "reproduce_minillm.py", argv, [results_table(teacher_scores, rows, args.seeds), cost_table(rows)],
                        sizes, wall, {"teacher": teacher_scores, "methods": rows})

if __name__ == "__main__":
    try:
        main()
    except LogitcacheError as exc:  # a bad flag value: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
