"""Build-side benchmark: build throughput vs the bare teacher forward, sampler speed, bytes per token.

    python benchmarks/bench_build.py --teacher demo-out/teacher-run/student --corpus demo-out/corpus.jsonl

Prints five tables (markdown); results with the command are kept in benchmarks/RESULTS.md. With no
teacher at ``--teacher`` it makes ``make demo``'s under ``--work`` (once); ``--make-teacher`` makes
a random-initialised one of any size instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from harness import best_time, ensure_teacher, fastest, peak_rss, run_fresh, small_corpus, teacher_arguments

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import read_shard
from logitcache.cache.summary import summarize
from logitcache.demo import TeacherSizes, make_teacher, stdlib_docstrings, write_corpus
from logitcache.native import library as native
from logitcache.targets.rng import row_keys
from logitcache.targets.rows import row_targets
from logitcache.targets.spec import TargetSpec
from logitcache.teacher.head import ONEDNN_SWITCH
from logitcache.teacher.load import load_teacher


def forward_pass(teacher, windows: np.ndarray, batch: int, streams: int = 1, model=None):
    """The bare teacher: ``model(input_ids).logits`` on the same batches, nothing else.

    ``model``: the Hugging Face model as a user would load it (torch's own linears); None runs the
    build's own forward instead: ``teacher.hidden_states`` then ``teacher.head`` on every position,
    whose linears go through oneDNN on x86 CPUs, so the build's own overhead can be read apart
    from its faster linears. ``streams > 1``: that many batches at once from a thread pool, each on
    an equal share of torch's threads (the best a hand-written CPU forward loop can do, and what
    ``build --cpu-streams`` does).
    """

    def one(i):
        ids = torch.from_numpy(windows[i : i + batch]).to(teacher.device)
        with torch.inference_mode():
            if model is None:
                hidden = teacher.hidden_states(ids)
                teacher.head(hidden.reshape(-1, hidden.shape[-1]))
            else:
                model(input_ids=ids).logits

    def run():
        starts = range(0, len(windows), batch)
        if streams == 1:
            for i in starts:
                one(i)
        else:
            threads = torch.get_num_threads()
            with ThreadPoolExecutor(streams, initializer=torch.set_num_threads, initargs=(max(1, threads // streams),)) as pool:
                list(pool.map(one, starts))
            torch.set_num_threads(threads)
        if teacher.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def plain_model(teacher):
    """The teacher's checkpoint loaded the way a user's script would: ``AutoModelForCausalLM``, nothing rerouted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher.path), dtype=teacher.torch_dtype, local_files_only=True)
    return model.to(teacher.device).eval()


def build_table(args, work: Path) -> list[str]:
    corpus = small_corpus(args.corpus, work / "bench.jsonl", args.corpus_bytes)
    base = dict(teacher=args.teacher, corpus=corpus, seq_len=args.seq_len, batch_size=args.batch_size, shard_size=512,
                overwrite=True, chunk_mib=args.chunk_mib, packing="stream")
    settings = BuildSettings(out=work / "x", **base)
    teacher = load_teacher(settings.teacher, settings.teacher_options())
    params = sum(p.numel() for p in teacher.model.parameters())
    print(f"teacher {params / 1e6:.0f}M parameters, vocab {teacher.vocab_size}, {teacher.dtype} on {teacher.device}; "
          f"seq_len {args.seq_len}, batch {args.batch_size}")
    cases = {}
    for method, extra in (("topk", {"k": 32}), ("sample", {"samples": 50})):
        settings = BuildSettings(out=work / f"build-{method}", method=method, **base, **extra)

        def fresh_build(settings=settings):
            shutil.rmtree(settings.out, ignore_errors=True)  # else a re-run resumes a finished build and does nothing
            run_build(settings, teacher=teacher)

        fresh_build()
        cases[method] = fresh_build
        cases[f"{method}-torch"] = switched_off(fresh_build, native.ENV_SWITCH, native.library.cache_clear)
        cases[f"{method}-linear"] = switched_off(fresh_build, ONEDNN_SWITCH)
    manifest = json.loads((work / "build-topk" / "manifest.json").read_text())
    windows = np.concatenate([read_shard(work / "build-topk" / s["file"]).input_ids for s in manifest["shards"]]).astype(np.int64)
    tokens = windows.size
    model = plain_model(teacher)
    cases = {"forward": forward_pass(teacher, windows, args.batch_size, model=model),
             "forward-head": forward_pass(teacher, windows, args.batch_size), **cases}
    if teacher.device.type == "cpu" and torch.get_num_threads() > 1:
        cases["forward-streams"] = forward_pass(teacher, windows, args.batch_size, streams=2, model=model)
    best = fastest(cases, args.rounds)
    fwd, fwd_head = best["forward"], best["forward-head"]

    def row(label: str, seconds: float) -> str:
        return f"| {label} | {tokens / seconds:,.0f} | {fwd / seconds:.2f} | {fwd_head / seconds:.2f} |"

    rows = ["| stage | tokens/s | ratio to bare forward | ratio to the build's own forward |",
            "|---|---:|---:|---:|",
            row("bare forward (`model(ids).logits`, the model as `AutoModelForCausalLM` loads it)", fwd),
            row("the build's own forward (`teacher.hidden_states`, then `teacher.head` on every position)", fwd_head)]
    if "forward-streams" in best:
        rows.append(row("bare forward, 2 batches at once on 1 thread each", best["forward-streams"]))
    for method, label in (("topk", "build topk k=32"), ("sample", "build sample N=50")):
        rows.append(row(f"{label} (whole `run_build`)", best[method]))
        rows.append(row(f"{label}, torch's linears (`LOGITCACHE_ONEDNN=0`)", best[f"{method}-linear"]))
        rows.append(row(f"{label}, torch targets (`LOGITCACHE_NATIVE=0`)", best[f"{method}-torch"]))
    return rows


def switched_off(fn, switch: str, reset=None):
    """``fn`` run with the environment switch ``switch`` set to 0 (``reset``: what to call around it
    so the switch is read again): the compiled target kernels or the oneDNN linears."""

    def run():
        os.environ[switch] = "0"
        if reset:
            reset()
        try:
            return fn()
        finally:
            del os.environ[switch]
            if reset:
                reset()

    return run


def sampler_table(vocabs: list[int], rows_per_call: int) -> list[str]:
    """Rows/s of ``row_targets`` (raw logits in, a build's per-row targets out) on one thread: the torch
    path and the compiled kernels, and the bare ``torch.multinomial`` draw a user would write."""
    out = ["| vocab | sample N=50, torch rows/s | sample N=50, compiled rows/s | speed-up | topk k=32, torch rows/s | "
           "topk k=32, compiled rows/s | speed-up | `torch.multinomial` N=50 rows/s |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread-CPU clock: torch's own worker threads would go uncounted
    for vocab in vocabs:
        logits = torch.randn(rows_per_call, vocab, generator=torch.Generator().manual_seed(0)) * 3
        labels = torch.arange(rows_per_call) % vocab
        keys = row_keys(0, torch.zeros(rows_per_call, dtype=torch.long), torch.arange(rows_per_call))
        times = {}
        for method in ("sample", "topk"):
            targets = partial(row_targets, logits, labels, keys, TargetSpec(method, k=32, samples=50))
            torch_path = switched_off(targets, native.ENV_SWITCH, native.library.cache_clear)
            times[method] = (best_time(torch_path, clock=time.thread_time), best_time(targets, clock=time.thread_time))
        # What users write: multinomial on the probabilities (counting ids afterwards is extra and not timed).
        theirs = best_time(partial(torch.multinomial, torch.softmax(logits, -1), 50, replacement=True), clock=time.thread_time)
        cells = [f"{rows_per_call / t:,.0f}" for t in times["sample"]] + [f"{times['sample'][0] / times['sample'][1]:.1f}"]
        cells += [f"{rows_per_call / t:,.0f}" for t in times["topk"]] + [f"{times['topk'][0] / times['topk'][1]:.1f}"]
        out.append(f"| {vocab} | {' | '.join(cells)} | {rows_per_call / theirs:,.0f} |")
    torch.set_num_threads(threads)
    return out


def head_table(rows: int) -> list[str]:
    """Rows/s of the output head on one thread (thread-CPU clock): torch's ``linear`` (MKL) against
    the build's ``teacher.linear`` (oneDNN on x86 CPUs), random float32 weights of each shape."""
    from logitcache.teacher.head import linear

    out = ["| hidden | vocab | `torch.nn.functional.linear` rows/s | build's head rows/s | speed-up | max abs difference |",
           "|---:|---:|---:|---:|---:|---:|"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    try:
        for hidden, vocab in ((128, 2048), (512, 8192), (768, 32768)):
            h = torch.randn(rows, hidden, generator=g)
            w = torch.randn(vocab, hidden, generator=g) / hidden**0.5
            theirs = best_time(partial(torch.nn.functional.linear, h, w), clock=time.thread_time)
            ours = best_time(partial(linear, h, w), clock=time.thread_time)
            gap = float((linear(h, w) - torch.nn.functional.linear(h, w)).abs().max())
            out.append(f"| {hidden} | {vocab} | {rows / theirs:,.0f} | {rows / ours:,.0f} | {theirs / ours:.1f} | {gap:.1e} |")
    finally:
        torch.set_num_threads(threads)
    return out


def storage_table(args, work: Path) -> list[str]:
    corpus = small_corpus(args.corpus, work / "bench.jsonl", args.corpus_bytes)
    out = ["| method | bytes/token | stored entries/position | bytes/entry (all columns) |", "|---|---:|---:|---:|"]
    teacher = None
    for method, extra in (("topk", {"k": 8}), ("topk", {"k": 32}), ("sample", {"samples": 50})):
        settings = BuildSettings(teacher=args.teacher, corpus=corpus, out=work / f"store-{method}-{extra}", method=method,
                                 seq_len=args.seq_len, batch_size=args.batch_size, shard_size=512, packing="stream", **extra)
        teacher = teacher or load_teacher(settings.teacher, settings.teacher_options())
        run_build(settings, teacher=teacher)
        s = summarize(settings.out)
        label = f"topk k={extra['k']}" if method == "topk" else "sample N=50"
        out.append(f"| {label} | {s['bytes_per_token']:.2f} | {s['mean_ids_per_position']:.2f} | {s['bytes_per_entry']:.2f} |")
    return out


def memory_build(case: dict) -> None:
    """One sample build of the memory table (run in a fresh process); prints the process's peak RSS in bytes."""
    run_build(BuildSettings(teacher=Path(case["teacher"]), corpus=Path(case["corpus"]), out=Path(case["out"]),
                            method="sample", samples=case["samples"], seq_len=case["seq_len"],
                            batch_size=case["batch_size"], shard_size=64))
    print(peak_rss())


def memory_table(args, work: Path) -> list[str]:
    """Peak RSS of a whole sample build (a fresh process each) as N grows; the teacher alone sets the floor."""
    corpus = small_corpus(args.corpus, work / "memory.jsonl", args.corpus_bytes // 4)
    out = ["| N | peak RSS (MiB) | stored entries/position |", "|---:|---:|---:|"]
    for n in (int(x) for x in args.memory_samples.split(",")):
        cache = work / f"memory-{n}"
        case = {"teacher": str(args.teacher), "corpus": str(corpus), "out": str(cache), "samples": n,
                "seq_len": args.seq_len, "batch_size": args.batch_size}
        peak_mib = int(run_fresh(__file__, "--memory-build", json.dumps(case)).split()[-1]) / 2**20
        out.append(f"| {n} | {peak_mib:,.0f} | {summarize(cache)['mean_ids_per_position']:.1f} |")
    return out


def random_teacher(preset: str, vocab: int, seq_len: int, repeat: int = 1) -> tuple[Path, Path]:
    """A random-initialised teacher of ``preset`` with a ``vocab``-row head (the demo recipe with a 4096-id
    tokenizer) and the stdlib docstrings ``repeat`` times as its corpus, under a temp folder."""
    root = Path(tempfile.mkdtemp(prefix="logitcache-bench-"))
    docs = list(stdlib_docstrings())
    write_corpus(root / "corpus.jsonl", iter(docs * repeat))
    sizes = TeacherSizes(vocab=4096, preset=preset, max_positions=max(seq_len, 128), head_rows=vocab)
    return make_teacher(root, docs, sizes), root / "corpus.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher_arguments(parser)
    parser.add_argument("--sampler-rows", type=int, default=2048)
    parser.add_argument("--head-rows", type=int, default=512, help="head table: rows per call")
    parser.add_argument("--rounds", type=int, default=5, help="build table: timed rounds over all cases, best kept")
    parser.add_argument("--tables", default="build,sampler,head,storage,memory", help="which tables to print, comma-separated")
    parser.add_argument("--memory-samples", default="50,5000,20000", help="memory table: the N of each build")
    parser.add_argument("--chunk-mib", type=int, default=None, help="head chunk bound passed to the build (default: the teacher's)")
    parser.add_argument("--make-teacher", metavar="PRESET", help="make a random-initialised teacher of this preset "
                        "(e.g. base: 12 layers, hidden 768) with --vocab ids instead of using --teacher; for GPU runs")
    parser.add_argument("--vocab", type=int, default=32768, help="output vocabulary of --make-teacher")
    parser.add_argument("--repeat", type=int, default=1, help="with --make-teacher: repeat the corpus this many times")
    parser.add_argument("--memory-build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_build:
        memory_build(json.loads(args.memory_build))
        return
    if args.make_teacher:
        args.teacher, args.corpus = random_teacher(args.make_teacher, args.vocab, args.seq_len, args.repeat)
    else:
        args.teacher, args.corpus = ensure_teacher(args.teacher, args.corpus, args.work)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tables = set(args.tables.split(","))
        if "build" in tables:
            print("\n## Build throughput\n\n" + "\n".join(build_table(args, work)), flush=True)
        if "sampler" in tables:
            vocab = json.loads((args.teacher / "config.json").read_text())["vocab_size"]
            print("\n## Sampler\n\n" + "\n".join(sampler_table(sorted({vocab, 8192, 32768}), args.sampler_rows)), flush=True)
        if "head" in tables:
            print("\n## Output head\n\n" + "\n".join(head_table(args.head_rows)), flush=True)
        if "storage" in tables:
            print("\n## Storage\n\n" + "\n".join(storage_table(args, work)), flush=True)
        if "memory" in tables:
            print("\n## Peak memory of a sample build (64-window shards)\n\n" + "\n".join(memory_table(args, work)))


if __name__ == "__main__":
    main()
