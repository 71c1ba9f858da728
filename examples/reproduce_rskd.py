"""Reproduce the comparison of "Sparse Logit Sampling" (RS-KD, arXiv 2503.16870) at a small size.

1. corpus: a text corpus given by path (any format ``logitcache build`` reads), or the Python
   standard library's docstrings; its first ``--corpus-bytes`` are copied to ``OUT/corpus.jsonl``;
2. teacher: a BPE tokenizer and a Llama pretrained on that corpus with ``logitcache train`` (CE);
3. caches, all over the same windows: top-k with k = vocabulary (the dense teacher: full KD),
   top-k 12, top-k 50 and an RS-KD sample with N = 50;
4. six students from one initial student, same steps and same batches: CE only, full KD
   (``kl`` on the k = V cache), top-k 12 renormalised, top-k 12 with a ghost token, top-k 50
   renormalised, RS-KD;
5. each student's held-out LM loss and ECE (the trainer's eval), its top-1 agreement with the
   teacher's argmax (read from the full cache for every student), and the angle between each method's batch gradient and the full-KD gradient, over ALL
   student parameters, on the held-out batches, at two points: the initial student and the
   trained CE-only student (every method at the same weights, on the same windows).

The table goes to stdout, ``OUT/results.md`` and ``OUT/results.json``. The defaults take about
7 minutes on 2 shared CPU cores; scale with flags, e.g. on a GPU::

    python examples/reproduce_rskd.py --corpus /data/text --corpus-bytes 8000000 --vocab 1024 \\
        --teacher-preset small --teacher-steps 2000 --student-preset micro --student-steps 1500 \\
        --seq-len 256 --batch-size 32 --device cuda

The full-KD cache stores every id of the vocabulary at every position: about 2.3 bytes x vocab per
token on disk (367 MB for the defaults, about 7 GB for the example above), which is why the
vocabulary stays small.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.summary import summarize
from logitcache.corpus import Corpus
from logitcache.demo import TeacherSizes, make_model, make_teacher, pretraining, stdlib_docstrings, write_corpus
from logitcache.errors import LogitcacheError
from logitcache.loader.dataset import CacheDataset
from logitcache.train.evaluate import teacher_top_ids
from logitcache.train.loop import run_train
from logitcache.train.objective import make_loss
from logitcache.train.settings import TrainSettings
from logitcache.train.student import load_student

SAMPLES = 50  # RS-KD draws per position, as in the paper
FULL = "full"  # the top-k cache with k = vocabulary size


@dataclass(frozen=True)
class Method:
    """One student: its row in the table, the cache it reads and the loss it trains with."""

    name: str
    cache: str
    loss: str


METHODS = (
    Method("CE only", "sample-50", "ce"),
    Method("full KD (dense teacher)", FULL, "kl"),
    Method("top-k 12, renormalised", "topk-12", "topk-renorm"),
    Method("top-k 12 + ghost token", "topk-12", "topk-ghost"),
    Method("top-k 50, renormalised", "topk-50", "topk-renorm"),
    Method(f"RS-KD, N={SAMPLES}", f"sample-{SAMPLES}", "rs-kd"),
)
REFERENCE = METHODS[1]  # full KD: every angle is measured against its gradient


def cache_builds(vocab_size: int) -> dict[str, dict]:
    """Cache name → the ``BuildSettings`` fields that make it."""
    return {
        FULL: {"method": "topk", "k": vocab_size},
        "topk-12": {"method": "topk", "k": 12},
        "topk-50": {"method": "topk", "k": 50},
        f"sample-{SAMPLES}": {"method": "sample", "samples": SAMPLES},
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--corpus", type=Path, default=None, help="text corpus (file or folder); default: the stdlib docstrings")
    add("--text-field", default="text", help="field holding the text in .jsonl/.parquet corpora")
    add("--corpus-bytes", type=int, default=600_000, help="use the first N bytes of the corpus (0: all)")
    add("--out", type=Path, default=Path("rskd-out"), help="folder for everything the run makes")
    add("--vocab", type=int, default=512, help="tokenizer vocabulary (the full-KD cache stores all of it)")
    add("--teacher-preset", default="micro", help="teacher size (logitcache.train.student.MODEL_PRESETS)")
    add("--teacher-steps", type=int, default=800, help="teacher pretraining steps")
    add("--student-preset", default="nano", help="student size")
    add("--student-steps", type=int, default=300, help="steps for every student")
    add("--seq-len", type=int, default=128, help="tokens per window")
    add("--batch-size", type=int, default=16, help="windows per step (teacher, students and gradient batches)")
    add("--lr", type=float, default=3e-3, help="peak learning rate of teacher and students")
    add("--eval-windows", type=int, default=64, help="held-out windows (the last of the corpus) for eval and angles")
    add("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    add("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add("--seed", type=int, default=0, help="seed of the student initialisation, data order and RS-KD draws")
    add("--rskd-draws", type=int, default=0, help="also train RS-KD students on N more draws of the sample "
        "cache (build seeds seed+1 .. seed+N), all else equal: how much RS-KD depends on its draw")
    args = parser.parse_args(argv)
    if args.eval_windows < args.batch_size:
        parser.error(f"--eval-windows {args.eval_windows} must be at least --batch-size {args.batch_size} (angles use whole batches)")
    return args


# ---- corpus, teacher, caches --------------------------------------------------------------


def first_bytes(documents: Iterable[str], limit: int) -> Iterator[str]:
    """The documents up to about ``limit`` UTF-8 bytes, the last one cut (``limit`` 0: all)."""
    left = limit
    for doc in documents:
        if limit and len(doc.encode()) >= left:
            yield doc[:left]
            return
        left -= len(doc.encode())
        yield doc


def write_run_corpus(args: argparse.Namespace) -> list[str]:
    """``OUT/corpus.jsonl``: the first ``--corpus-bytes`` of the corpus; returns its documents."""
    source = stdlib_docstrings() if args.corpus is None else Corpus.open(args.corpus, args.text_field).documents()
    documents = list(first_bytes(source, args.corpus_bytes))
    write_corpus(args.out / "corpus.jsonl", iter(documents))
    return documents


def train_teacher(args: argparse.Namespace, documents: list[str]) -> tuple[Path, dict]:
    """A tokenizer and a teacher pretrained on the corpus (the demo's recipe, this run's sizes); returns the
    teacher folder and its final metrics."""
    make_teacher(args.out, documents, TeacherSizes(vocab=args.vocab, preset=args.teacher_preset, max_positions=args.seq_len))
    metrics = run_train(pretraining(
        args.out, args.teacher_steps, args.seq_len, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=min(30, args.teacher_steps // 10), eval_windows=args.eval_windows, save_every=0, seed=args.seed,
        device=args.device,
    ))
    return Path(metrics["student"]), metrics


def build_caches(args: argparse.Namespace, teacher: Path, vocab_size: int) -> dict[str, Path]:
    """Every cache of :func:`cache_builds`, over the same windows of ``OUT/corpus.jsonl``."""
    caches = {}
    for name, fields in cache_builds(vocab_size).items():
        caches[name] = args.out / "caches" / name
        run_build(BuildSettings(
            teacher=teacher, corpus=args.out / "corpus.jsonl", out=caches[name], seq_len=args.seq_len,
            batch_size=args.batch_size, shard_size=512, seed=args.seed, device=args.device, overwrite=True,
            packing="stream", **fields,  # the teacher was pretrained on packed streams
        ))
    return caches


# ---- students -----------------------------------------------------------------------------


def student_settings(args: argparse.Namespace, method: Method, cache: Path, init: Path) -> TrainSettings:
    return TrainSettings(
        out=args.out / "students" / method.loss / method.cache, cache=cache, loss=method.loss, init_from=init,
        steps=args.student_steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=min(20, args.student_steps // 10),
        eval_every=args.student_steps, eval_windows=args.eval_windows, save_every=0, seed=args.seed, device=args.device,
    )


def train_students(args: argparse.Namespace, caches: dict[str, Path], init: Path) -> dict[Method, dict]:
    """Every method's student, from the same initial weights, on the same batches in the same order."""
    results = {}
    for method in METHODS:
        settings = student_settings(args, method, caches[method.cache], init)
        results[method] = run_train(settings)
        print(f"  {method.name}: eval LM loss {results[method]['eval_lm_loss']:.4f}", flush=True)
    return results


def rskd_redraws(args: argparse.Namespace, teacher: Path, init: Path) -> list[dict]:
    """RS-KD students on ``--rskd-draws`` further draws of the sample cache; same teacher, init and batches."""
    method = METHODS[-1]
    fields = cache_builds(0)[method.cache]
    rows = []
    for build_seed in range(args.seed + 1, args.seed + 1 + args.rskd_draws):
        cache = args.out / "caches" / f"{method.cache}-draw{build_seed}"
        run_build(BuildSettings(
            teacher=teacher, corpus=args.out / "corpus.jsonl", out=cache, seq_len=args.seq_len,
            batch_size=args.batch_size, shard_size=512, seed=build_seed, device=args.device, overwrite=True,
            packing="stream", **fields,
        ))
        settings = replace(student_settings(args, method, cache, init), out=args.out / "students" / f"rs-kd-draw{build_seed}")
        metrics = run_train(settings)
        rows.append({"build_seed": build_seed, "lm_loss": metrics["eval_lm_loss"], "ece": metrics["eval_ece"]})
        print(f"  RS-KD, draw {build_seed}: eval LM loss {metrics['eval_lm_loss']:.4f}", flush=True)
    return rows


# ---- gradient angles ----------------------------------------------------------------------


def angle_degrees(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two vectors, ``2 atan2(|â - b̂|, |â + b̂|)``: exactly 0 for equal vectors, stable near 0 and 180."""
    a, b = a / a.norm(), b / b.norm()
    return math.degrees(2.0 * math.atan2(float((a - b).norm()), float((a + b).norm())))


def gradient_angles(args: argparse.Namespace, caches: dict[str, Path], weights: Path) -> dict[Method, float]:
    """Mean over the held-out batches of the angle between each method's gradient and full KD's.

    Gradients are of the mean loss per position over ALL parameters of the student at ``weights``;
    every method sees the same windows (the held-out split the trainer evaluates on, which no
    student trained on) with its own cache's targets.
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_student(weights).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    sources = {}
    for method in METHODS:
        held_out = CacheDataset(
            caches[method.cache], seed=args.seed, global_batch_size=args.batch_size, shuffle=False,
            rank=0, world_size=1, holdout=args.eval_windows, split="eval",
        )
        loss = make_loss(TrainSettings(out=args.out, cache=caches[method.cache], loss=method.loss), held_out.manifest, 0.0)
        sources[method] = (list(held_out.dataloader()), loss)
    angles = {method: [] for method in METHODS}
    for i, reference_batch in enumerate(sources[REFERENCE][0]):
        logits = model(input_ids=reference_batch["input_ids"].to(device)).logits[:, :-1]
        gradients = {}
        for method, (batches, loss_fn) in sources.items():
            batch = {k: v.to(device) for k, v in batches[i].items()}
            assert torch.equal(batch["input_ids"], reference_batch["input_ids"].to(device)), "caches disagree on windows"
            loss = loss_fn(logits, batch).mean()
            gradients[method] = torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)]).double()
        for method in METHODS:
            angles[method].append(angle_degrees(gradients[method], gradients[REFERENCE]))
    return {method: sum(values) / len(values) for method, values in angles.items()}


def top1_agreement(args: argparse.Namespace, full_cache: Path, weights: Path) -> float:
    """Share of held-out positions where the student at ``weights`` ranks first the id the teacher does.

    The teacher's first id comes from the full (k = vocabulary) cache for every student, so all rows
    share one reference (a student's own sampled or top-k cache could name another id).
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_student(weights).to(device).eval()
    held_out = CacheDataset(full_cache, seed=args.seed, global_batch_size=args.batch_size, shuffle=False,
                            rank=0, world_size=1, holdout=args.eval_windows, split="eval")
    agree = counted = 0
    with torch.no_grad():
        for batch in held_out.dataloader():
            logits = model(input_ids=batch["input_ids"].to(device)).logits[:, :-1]
            mask = batch["position_mask"].to(device)
            agree += int(((logits.argmax(-1) == teacher_top_ids(batch).to(device)) & mask).sum())
            counted += int(mask.sum())
    return agree / counted


# ---- report -------------------------------------------------------------------------------


def results_table(rows: list[dict], teacher: dict) -> str:
    """The markdown table of students (and the teacher for scale)."""
    lines = [
        "| target | LM loss | ECE % | top-1 agreement % | angle to full KD, initial student | angle to full KD, CE student |",
        "|---|---|---|---|---|---|",
        f"| (teacher) | {teacher['lm_loss']:.3f} | {100 * teacher['ece']:.2f} | — | — | — |",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['lm_loss']:.3f} | {100 * r['ece']:.2f} | {100 * r['top1_agreement']:.1f} "
            f"| {r['angle_init']:.1f}° | {r['angle_trained']:.1f}° |"
        )
    return "\n".join(lines)


def caches_table(caches: dict[str, Path]) -> str:
    lines = ["| cache | ids per position | teacher mass covered | MB on disk |", "|---|---|---|---|"]
    for name, path in caches.items():
        s = summarize(path)
        covered = "— (sampled)" if s["mean_covered_mass"] is None else f"{100 * s['mean_covered_mass']:.1f} %"
        lines.append(f"| {name} | {s['mean_ids_per_position']:.1f} | {covered} | {s['bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores ({platform.machine()})"
    return f"{device}, torch {torch.__version__} with {torch.get_num_threads()} CPU threads, Python {platform.python_version()}"


def write_report(args: argparse.Namespace, report: dict, markdown: str) -> None:
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.monotonic()
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    for folder in ("teacher-run", "students"):  # a re-run trains afresh; caches of the same build are reused
        shutil.rmtree(args.out / folder, ignore_errors=True)

    print("1. corpus", flush=True)
    documents = write_run_corpus(args)
    print("2. teacher", flush=True)
    teacher, teacher_metrics = train_teacher(args, documents)
    vocab_size = load_student(teacher).get_output_embeddings().weight.shape[0]
    print(f"   held-out LM loss {teacher_metrics['eval_lm_loss']:.3f}; vocabulary {vocab_size}", flush=True)
    print("3. caches", flush=True)
    caches = build_caches(args, teacher, vocab_size)
    print("4. students", flush=True)
    init = args.out / "student-init"
    make_model(args.out / "tokenizer", init, preset=args.student_preset, max_positions=args.seq_len, seed=args.seed)
    students = train_students(args, caches, init)
    print("5. gradient angles", flush=True)
    ce_student = Path(students[METHODS[0]]["student"])
    at_init = gradient_angles(args, caches, init)
    at_trained = gradient_angles(args, caches, ce_student)

    rows = [
        {"name": m.name, "cache": m.cache, "loss": m.loss, "lm_loss": students[m]["eval_lm_loss"],
         "ece": students[m]["eval_ece"], "top1_agreement": top1_agreement(args, caches[FULL], Path(students[m]["student"])),
         "angle_init": at_init[m], "angle_trained": at_trained[m]}
        for m in METHODS
    ]
    teacher_row = {"lm_loss": teacher_metrics["eval_lm_loss"], "ece": teacher_metrics["eval_ece"]}
    if args.rskd_draws:
        print("6. RS-KD on further draws", flush=True)
    rs_kd = {"build_seed": args.seed, "lm_loss": rows[-1]["lm_loss"], "ece": rows[-1]["ece"]}
    draws = [rs_kd, *rskd_redraws(args, teacher, init)] if args.rskd_draws else []
    wall = time.monotonic() - started
    manifest = json.loads((caches[FULL] / "manifest.json").read_text())
    sizes = (
        f"corpus {sum(len(d.encode()) for d in documents) / 1e6:.2f} MB "
        f"({'stdlib docstrings' if args.corpus is None else args.corpus}), vocabulary {vocab_size}, "
        f"{manifest['totals']['sequences']} windows of {args.seq_len} tokens ({args.eval_windows} held out); "
        f"teacher {args.teacher_preset} x {args.teacher_steps} steps, students {args.student_preset} x "
        f"{args.student_steps} steps, {args.batch_size} windows per step"
    )
    command = "python examples/reproduce_rskd.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    table = results_table(rows, teacher_row)
    draws_table = [
        "| RS-KD cache draw (build seed) | LM loss | ECE % |\n|---|---|---|\n"
        + "\n".join(f"| {d['build_seed']} | {d['lm_loss']:.3f} | {100 * d['ece']:.2f} |" for d in draws)
    ] if draws else []
    markdown = "\n\n".join([
        table, caches_table(caches), *draws_table,
        f"Command: `{command.strip()}`", f"Machine: {machine()}", f"Sizes: {sizes}", f"Wall time: {wall / 60:.1f} min",
    ])
    report = {"command": command.strip(), "machine": machine(), "sizes": sizes, "wall_seconds": wall,
              "teacher": teacher_row, "methods": rows, "rskd_draws": draws}
    write_report(args, report, markdown)
    print("\n" + markdown, flush=True)
    return report


if __name__ == "__main__":
    try:
        main()
    except LogitcacheError as exc:  # a missing corpus, a bad flag value: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
