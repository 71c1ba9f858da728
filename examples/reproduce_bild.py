"""Reproduce the task-distillation comparison of BiLD (arXiv 2406.13555) and RLKD (arXiv 2409.12545) at a small size.

1. tasks: the offline instruction task set of ``examples/tasks.py`` (five kinds with exactly checkable
   answers), ``--train`` training and ``--held-out`` held-out prompts, as chat records; a small chat
   template, ``OUT/chat.jinja``, that every command below is given;
2. teacher: a BPE tokenizer trained on the training prompts and answers, and a Llama fine-tuned on the
   training chats from random weights with ``logitcache train --format chat`` (SFT: CE on the answers);
3. caches of the teacher on the training chats (``build --format chat``: targets only where the next
   token is the assistant's): top-k 8, top-k 32 and an RS-KD sample with N = 50; a top-k 8 cache of the
   held-out chats (for the response LM loss); and, to measure storage, the same training chats rendered
   as plain text and cached at every position;
4. students from one initial student per seed, the same steps, batch size and learning rate: SFT (CE on
   the answers, ``train --corpus --format chat``), top-k forward KL and reverse KL (top-k 32), BiLD
   (top-k 8), RLKD (rank loss + KL, top-k 32) and RS-KD (the sample);
5. every model scored on the held-out prompts: exact match of its greedy answers (``logitcache
   evaluate``'s function) and its LM loss on the reference answers' tokens (response positions only).

Seeds (``--seeds``) change the student initialisation and data order; the task set, tokenizer, teacher
and caches (RS-KD draws from build seed 0) are the same for all. The tables go to stdout, ``OUT/results.md`` and ``OUT/results.json``.
The defaults take about 12 minutes on 2 shared CPU cores (examples/REPRODUCE_BILD.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.manifest import read_manifest
from logitcache.demo import TeacherSizes, make_model, make_teacher, write_corpus
from logitcache.errors import LogitcacheError
from logitcache.generate.settings import EvaluateSettings
from logitcache.generate.tasks import run_evaluate
from logitcache.loader.dataset import CacheDataset
from logitcache.losses.sparse import ce_loss
from logitcache.train.loop import run_train
from logitcache.train.settings import TrainSettings
from logitcache.train.student import load_student

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/tasks.py, beside this script
from tasks import TASKS, make_tasks, write_records  # noqa: E402

# A role header per turn and the tokenizer's EOS after each answer, which ends a greedy answer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SAMPLES = 50  # RS-KD draws per position
SFT = "sft"  # the students' "cache" that is the chat corpus itself


@dataclass(frozen=True)
class Method:
    """One student: its row in the table, the cache it reads (or :data:`SFT`), its loss and loss options."""

    name: str
    cache: str
    loss: str
    loss_k: int | None = None


METHODS = (
    Method("SFT only", SFT, "ce"),
    Method("top-k forward KL (k=32)", "topk-32", "kl"),
    Method("reverse KL (k=32)", "topk-32", "reverse-kl"),
    Method("BiLD (k=8)", "topk-8", "bild"),
    Method("RLKD (rank k=5 + KL, k=32)", "topk-32", "rlkd", loss_k=5),
    Method(f"RS-KD (N={SAMPLES})", f"sample-{SAMPLES}", "rs-kd"),
)
CACHES = {  # cache name → the BuildSettings fields that make it
    "topk-8": {"method": "topk", "k": 8},
    "topk-32": {"method": "topk", "k": 32},
    f"sample-{SAMPLES}": {"method": "sample", "samples": SAMPLES},
}
HELD_OUT_BUILD = "topk-8"  # how the held-out chats are cached: only their tokens and response positions are used


def add_task_arguments(add: Callable[..., object]) -> None:
    """The options of the task set, the tokenizer, the teacher, the students' size and training, scoring and the
    machine (``add``: a parser's ``add_argument``), which reproduce_minillm.py shares."""
    add("--train", type=int, default=20000, help="training prompts (the kinds in turn)")
    add("--held-out", type=int, default=200, help="held-out prompts, none of them a training prompt")
    add("--task-seed", type=int, default=0, help="seed of the task set")
    add("--vocab", type=int, default=512, help="tokenizer vocabulary")
    add("--teacher-preset", default="micro", help="teacher size (logitcache.train.student.MODEL_PRESETS)")
    add("--teacher-steps", type=int, default=3000, help="teacher fine-tuning steps")
    add("--student-preset", default="nano", help="student size")
    add("--seq-len", type=int, default=96, help="longest rendered training chat in tokens (longer ones are cut; the report counts them)")
    add("--batch-size", type=int, default=32, help="chats per step (teacher and students)")
    add("--lr", type=float, default=3e-3, help="peak learning rate of teacher and students")
    add("--max-new-tokens", type=int, default=32, help="longest generated answer (greedy when scoring)")
    add("--seeds", type=int, nargs="+", default=[0, 1], help="student seeds (initial weights, data order, samples)")
    add("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, default=Path("bild-out"), help="folder for everything the run makes")
    add_task_arguments(add)
    add("--student-steps", type=int, default=500, help="steps for every student")
    args = parser.parse_args(argv)
    check_task_arguments(parser, args)
    return args


def check_task_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``parser.error``) a held-out set without a prompt of each kind."""
    if args.held_out < len(TASKS):
        parser.error(f"--held-out {args.held_out}: need at least {len(TASKS)}, one prompt of each kind")


# ---- tasks, teacher, caches ---------------------------------------------------------------


def write_task_set(args: argparse.Namespace) -> list[dict]:
    """``OUT/tasks/train.jsonl``, ``OUT/tasks/held_out.jsonl`` and the held-out prompts of each kind
    (``held_out-KIND.jsonl``), and ``OUT/chat.jinja``; returns the training records."""
    train, held_out = make_tasks(args.task_seed, args.train, args.held_out)
    write_records(args.out / "tasks" / "train.jsonl", train)
    write_records(args.out / "tasks" / "held_out.jsonl", held_out)
    for kind in TASKS:
        write_records(args.out / "tasks" / f"held_out-{kind}.jsonl", [r for r in held_out if r["kind"] == kind])
    (args.out / "chat.jinja").write_text(CHAT_TEMPLATE)
    return train


def train_teacher(args: argparse.Namespace, train: list[dict]) -> Path:
    """A tokenizer trained on the training chats' text and a teacher fine-tuned on them (SFT from random
    weights); returns the teacher folder."""
    texts = [message["content"] for record in train for message in record["messages"]]
    texts += [f"<|{role}|>\n" for role in ("user", "assistant")]
    make_teacher(args.out, texts, TeacherSizes(vocab=args.vocab, preset=args.teacher_preset, max_positions=context(args)))
    metrics = run_train(sft_settings(args, args.out / "teacher-run", args.out / "teacher-init", args.teacher_steps, seed=0))
    return Path(metrics["student"])


def context(args: argparse.Namespace) -> int:
    """The models' context: a rendered chat, or a prompt of one and a greedy answer of ``--max-new-tokens``."""
    return args.seq_len + args.max_new_tokens


def sft_settings(args: argparse.Namespace, out: Path, init: Path, steps: int, seed: int) -> TrainSettings:
    """CE on the assistant's tokens of the training chats (``train --corpus --format chat``), from ``init``."""
    return TrainSettings(
        out=out, corpus=args.out / "tasks" / "train.jsonl", tokenizer=args.out / "tokenizer", format="chat",
        chat_template=args.out / "chat.jinja", seq_len=args.seq_len,
        init_from=init, loss="ce", **common_settings(args, steps, seed),
    )


def common_settings(args: argparse.Namespace, steps: int, seed: int) -> dict:
    """What every training run here shares: steps, batch, learning rate, no eval or checkpoints on the way."""
    return dict(steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(50, steps // 10),
                eval_every=0, save_every=0, seed=seed, device=args.device)


def build(args: argparse.Namespace, teacher: Path, corpus: Path, out: Path, fmt: str, fields: dict) -> Path:
    """One cache of ``teacher`` on ``corpus`` (one example per row, RS-KD draws from build seed 0); returns its folder."""
    run_build(BuildSettings(
        teacher=teacher, corpus=corpus, out=out, format=fmt, chat_template=args.out / "chat.jinja" if fmt == "chat" else None,
        seq_len=args.seq_len, packing="documents", batch_size=32, seed=0, device=args.device,
        overwrite=True, **fields,
    ))
    return out


def rendered_corpus(args: argparse.Namespace, train: list[dict]) -> Path:
    """``OUT/tasks/train-rendered.jsonl``: the training chats as the template renders them, as plain text."""
    tokenizer = AutoTokenizer.from_pretrained(str(args.out / "tokenizer"), local_files_only=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    path = args.out / "tasks" / "train-rendered.jsonl"
    write_corpus(path, (tokenizer.apply_chat_template(record["messages"], tokenize=False) for record in train))
    return path


def storage_rows(args: argparse.Namespace, teacher: Path, train: list[dict], caches: dict[str, Path]) -> list[dict]:
    """Bytes of each response-only training cache against the same chats cached at every position."""
    corpus = rendered_corpus(args, train)
    rows = []
    for name, fields in CACHES.items():
        every = build(args, teacher, corpus, args.out / "caches" / f"{name}-every-position", "text", fields)
        response, full = read_manifest(caches[name]), read_manifest(every)
        rows.append({"cache": name, "response_positions": response["corpus"]["target_positions"],
                     "response_bytes": response["totals"]["bytes"], "every_positions": full["totals"]["positions"],
                     "every_bytes": full["totals"]["bytes"]})
        shutil.rmtree(every)  # only its size was wanted
    return rows


# ---- students and scores ------------------------------------------------------------------


def train_student(args: argparse.Namespace, method: Method, caches: dict[str, Path], init: Path, seed: int) -> Path:
    """One method's student from ``init``; returns its folder."""
    out = args.out / f"seed-{seed}" / method.loss
    if method.cache == SFT:
        settings = sft_settings(args, out, init, args.student_steps, seed)
    else:
        settings = TrainSettings(out=out, cache=caches[method.cache], loss=method.loss, loss_k=method.loss_k,
                                 init_from=init, **common_settings(args, args.student_steps, seed))
    return Path(run_train(settings)["student"])


@torch.no_grad()
def response_lm_loss(model_dir: Path, held_out_cache: Path, device: torch.device) -> float:
    """Mean CE of the model at the held-out chats' response positions (those with stored targets), in nats."""
    model = load_student(model_dir).to(device).eval()
    chats = CacheDataset(held_out_cache, seed=0, global_batch_size=1, shuffle=False, rank=0, world_size=1)
    total = tokens = 0.0
    for batch in chats.dataloader():
        batch = {key: value.to(device) for key, value in batch.items()}
        loss = ce_loss(model(input_ids=batch["input_ids"]).logits[:, :-1].float(), batch)
        total, tokens = total + float(loss.total), tokens + int(loss.tokens)
    return total / tokens


def score(args: argparse.Namespace, model_dir: Path, held_out_cache: Path) -> dict:
    """Exact match and ROUGE-L of the greedy answers to the held-out prompts (all, and of each kind), and
    the response LM loss."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kinds = {kind: run_evaluate(EvaluateSettings(
        model=model_dir, prompts=args.out / "tasks" / f"held_out-{kind}.jsonl", chat_template=args.out / "chat.jinja",
        max_new_tokens=args.max_new_tokens, batch_size=50, device=args.device,
    )) for kind in TASKS}
    prompts = sum(k["prompts"] for k in kinds.values())
    return {
        **{metric: sum(k[metric] * k["prompts"] for k in kinds.values()) / prompts for metric in ("exact_match", "rouge_l")},
        "exact_match_by_kind": {kind: k["exact_match"] for kind, k in kinds.items()},
        "lm_loss": response_lm_loss(model_dir, held_out_cache, device),
    }


# ---- report -------------------------------------------------------------------------------


def results_table(teacher: dict, rows: list[dict], seeds: list[int]) -> str:
    """Exact match % and response LM loss per seed and their mean, one row per method."""
    header = ([f"EM % seed {s}" for s in seeds] + ["EM % mean"] + [f"LM loss seed {s}" for s in seeds] + ["LM loss mean"])
    lines = ["| method | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    blank = " | ".join("—" for _ in seeds)
    lines.append(f"| (teacher) | {blank} | {100 * teacher['exact_match']:.1f} | {blank} | {teacher['lm_loss']:.3f} |")
    for row in rows:
        em = [100 * s["exact_match"] for s in row["seeds"]]
        lm = [s["lm_loss"] for s in row["seeds"]]
        lines.append(f"| {row['name']} | " + " | ".join(f"{v:.1f}" for v in em) + f" | {statistics.mean(em):.1f} | "
                     + " | ".join(f"{v:.3f}" for v in lm) + f" | {statistics.mean(lm):.3f} |")
    return "\n".join(lines)


def kinds_table(teacher: dict, rows: list[dict]) -> str:
    """Exact match % on each kind of held-out prompt, the mean over seeds."""
    lines = ["| method | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    for name, runs in [("(teacher)", [teacher]), *((row["name"], row["seeds"]) for row in rows)]:
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * statistics.mean(run['exact_match_by_kind'][kind] for run in runs):.1f}" for kind in TASKS) + " |")
    return "\n".join(lines)


def storage_table(rows: list[dict]) -> str:
    lines = ["| cache | response-only: positions | MB | every position: positions | MB | ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['cache']} | {r['response_positions']:,} | {r['response_bytes'] / 1e6:.2f} | {r['every_positions']:,} "
                     f"| {r['every_bytes'] / 1e6:.2f} | {r['every_bytes'] / r['response_bytes']:.1f}× |")
    return "\n".join(lines)


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores ({platform.machine()})"
    return f"{device}, torch {torch.__version__} with {torch.get_num_threads()} CPU threads, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    for folder in ("tasks", "tokenizer", "teacher-init", "teacher-run", "caches", *(f"seed-{s}" for s in args.seeds)):
        shutil.rmtree(args.out / folder, ignore_errors=True)  # every run starts afresh: its figures come from one code state

    print("1. tasks", flush=True)
    train = write_task_set(args)
    print("2. teacher", flush=True)
    teacher = train_teacher(args, train)
    print("3. caches", flush=True)
    train_chats, held_out_chats = args.out / "tasks" / "train.jsonl", args.out / "tasks" / "held_out.jsonl"
    caches = {name: build(args, teacher, train_chats, args.out / "caches" / name, "chat", fields) for name, fields in CACHES.items()}
    held_out_cache = build(args, teacher, held_out_chats, args.out / "caches" / "held-out", "chat", CACHES[HELD_OUT_BUILD])
    teacher_scores = score(args, teacher, held_out_cache)
    print(f"   teacher: exact match {100 * teacher_scores['exact_match']:.1f} %, response LM loss "
          f"{teacher_scores['lm_loss']:.3f}", flush=True)
    storage = storage_rows(args, teacher, train, caches)
    print("4. students", flush=True)
    rows = [{"name": m.name, "cache": m.cache, "loss": m.loss, "seeds": []} for m in METHODS]
    for seed in args.seeds:
        init = args.out / f"seed-{seed}" / "student-init"
        make_model(args.out / "tokenizer", init, preset=args.student_preset, max_positions=context(args), seed=seed)
        for method, row in zip(METHODS, rows):
            scores = score(args, train_student(args, method, caches, init, seed), held_out_cache)
            row["seeds"].append({"seed": seed, **scores})
            print(f"   seed {seed}, {method.name}: exact match {100 * scores['exact_match']:.1f} %, "
                  f"LM loss {scores['lm_loss']:.3f}", flush=True)

    wall = time.monotonic() - started
    truncated = sum(read_manifest(cache)["corpus"]["truncated"] for cache in (caches["topk-8"], held_out_cache))
    sizes = (f"{args.train} training and {args.held_out} held-out prompts ({truncated} cut at --seq-len "
             f"{args.seq_len}), vocabulary {args.vocab}; teacher "
             f"{args.teacher_preset} x {args.teacher_steps} steps, students {args.student_preset} x {args.student_steps} "
             f"steps, {args.batch_size} chats per step")
    tables = [results_table(teacher_scores, rows, args.seeds), kinds_table(teacher_scores, rows), storage_table(storage)]
    return write_report(args.out, "reproduce_bild.py", argv, tables, sizes, wall,
                        {"teacher": teacher_scores, "methods": rows, "storage": storage})


def write_report(out: Path, script: str, argv: list[str] | None, tables: list[str], sizes: str, wall: float,
                 results: dict) -> dict:
    """``OUT/results.md`` (the ``tables``, the command, machine, sizes and wall time) and ``OUT/results.json``
    (the same with ``results``), printed too; returns the JSON report."""
    command = f"python examples/{script} " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    markdown = "\n\n".join([
        *tables, f"Command: `{command.strip()}`", f"Machine: {machine()}", f"Sizes: {sizes}", f"Wall time: {wall / 60:.1f} min",
    ])
    report = {"command": command.strip(), "machine": machine(), "sizes": sizes, "wall_seconds": wall, **results}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown + "\n")
    print("\n" + markdown, flush=True)
    return report

if __name__ == "__main__":
    try:
        main()
    except LogitcacheError as exc:  # a bad flag value: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
