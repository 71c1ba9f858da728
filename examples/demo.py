"""The embedded demo: everything from local text, nothing downloaded.

1. corpus: docstrings of the Python standard library (read with ``ast``, nothing imported);
2. teacher: a byte-level BPE tokenizer and a small Llama, pretrained with ``logitcache train`` (CE only);
3. cache: ``logitcache build`` with ``--method topk`` and ``--method sample``, then ``logitcache inspect``;
4. students: two trained from the sample cache for the same steps, CE only and RS-KD;
   their held-out LM loss and ECE are printed side by side.

Run ``make demo`` (or ``python examples/demo.py --out demo-out``). Sizes are flags; the defaults
finish in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from logitcache.demo import PRETRAIN_STEPS, TeacherSizes, make_trained_teacher, stdlib_docstrings, write_corpus

console = Console()


def logitcache(*args: str) -> None:
    """Run one ``logitcache`` command as a user would, echoing it first."""
    console.print(f"\n[bold cyan]$ logitcache {' '.join(shlex.quote(str(a)) for a in args)}[/bold cyan]")
    subprocess.run([sys.executable, "-m", "logitcache", *map(str, args)], check=True)


def final_eval(run_dir: Path) -> dict:
    """The last evaluation record of a ``logitcache train`` run."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("kind") == "eval"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for everything the demo makes")
    parser.add_argument("--vocab", type=int, default=TeacherSizes.vocab, help="tokenizer vocabulary size")
    parser.add_argument("--teacher-preset", default=TeacherSizes.preset,
                        help="teacher size (logitcache.train.student.MODEL_PRESETS)")
    parser.add_argument("--teacher-steps", type=int, default=PRETRAIN_STEPS, help="teacher pretraining steps")
    parser.add_argument("--student-preset", default="nano", help="student size")
    parser.add_argument("--student-steps", type=int, default=150, help="steps for each student")
    parser.add_argument("--distill-docs", type=int, default=2000, help="documents cached and distilled on (the first ones)")
    parser.add_argument("--seq-len", type=int, default=TeacherSizes.max_positions, help="tokens per window")
    args = parser.parse_args()
    out: Path = args.out
    started = time.monotonic()
    for run in ("teacher-run", "student-ce", "student-rs-kd"):  # a re-run of the demo starts its training afresh
        shutil.rmtree(out / run, ignore_errors=True)

    console.rule("1. corpus and tokenizer from the Python standard library's docstrings")
    docs = list(stdlib_docstrings())
    corpus = out / "corpus.jsonl"
    write_corpus(corpus, iter(docs))
    distill = out / "distill.jsonl"
    write_corpus(distill, iter(docs[: args.distill_docs]))
    console.print(f"{len(docs)} documents, {corpus.stat().st_size / 1e6:.1f} MB → {corpus}; tokenizer of {args.vocab} ids")

    console.rule("2. the teacher: a small Llama pretrained on that corpus (CE only)")
    sizes = TeacherSizes(vocab=args.vocab, preset=args.teacher_preset, max_positions=args.seq_len)
    teacher = make_trained_teacher(out, docs, sizes, steps=args.teacher_steps, seq_len=args.seq_len, run=logitcache)

    console.rule("3. the cache: top-k and RS-KD sampled targets")
    for method, extra in (("topk", ("--k", 32)), ("sample", ("--samples", 50))):
        logitcache(
            "build", "--teacher", teacher, "--corpus", distill, "--out", out / f"cache-{method}",
            "--method", method, *extra, "--seq-len", args.seq_len, "--packing", "stream",  # as the teacher was trained
            "--batch-size", 16, "--shard-size", 512, "--overwrite",
        )
    logitcache("validate", out / "cache-sample")

    console.rule("4. two students from the sample cache: CE only vs RS-KD")
    for loss in ("ce", "rs-kd"):
        logitcache(
            "train", "--cache", out / "cache-sample", "--loss", loss, "--out", out / f"student-{loss}",
            "--student", args.student_preset, "--steps", args.student_steps, "--batch-size", 16, "--lr", 3e-3,
            "--warmup-steps", min(20, args.student_steps - 1), "--eval-every", args.student_steps,
            "--save-every", args.student_steps,
        )

    summary = json.loads(subprocess.run(
        [sys.executable, "-m", "logitcache", "inspect", out / "cache-sample", "--json"], capture_output=True, text=True, check=True,
    ).stdout)
    table = Table(title="held-out windows, same student, same steps")
    for column in ("student", "LM loss (nats)", "ECE (%)", "top-1 agreement with teacher (%)"):
        table.add_column(column, justify="right")
    for loss in ("ce", "rs-kd"):
        m = final_eval(out / f"student-{loss}")
        table.add_row(loss, f"{m['lm_loss']:.3f}", f"{100 * m['ece']:.2f}", f"{100 * m['top1_agreement']:.1f}")
    console.print()
    console.print(table)
    console.print(
        f"teacher perplexity on the corpus {summary['teacher_perplexity']:.1f}; "
        f"mean distinct ids per position at N=50: {summary['mean_ids_per_position']:.1f} "
        f"(a random-initialised teacher gives ~50); {summary['bytes_per_token']:.1f} bytes per token"
    )
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is under {out}/")


if __name__ == "__main__":
    main()
