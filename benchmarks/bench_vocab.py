"""Speed and memory at real vocabularies, 2k → 262k ids: target kernels, head chunk sizes, whole builds.

    python benchmarks/bench_vocab.py --tables targets,chunks,build

Three tables (markdown; results with the commands in benchmarks/RESULTS.md):

- ``targets``: rows/s of :func:`logitcache.targets.rows.row_targets` (the build's path: the compiled
  kernels) for top-k k=32 and sample N=50 on peaked float32 logits, next to one pass over the same
  rows (``torch.logsumexp(rows, -1)``), one thread, thread-CPU clock.
- ``chunks``: tokens/s of the build's output head + targets on one thread as the rows per head
  chunk grow, on the teacher's own head and final hidden states (one thread: what each of the
  build's two CPU streams gets on this project's 2-core machine).
- ``build``: whole processes: ``python -m logitcache build`` against a bare-forward script (load
  the model, ``model(ids).logits.log_softmax(-1)`` over the same windows), rounds interleaved,
  medians of wall and CPU time; the start-up's share (from a run on about one batch); each
  process's peak RSS (``VmHWM``, read inside it).

The teachers are random-initialised Llama models of a realistic shape (hidden 640, 18 layers,
intermediate 2048, 2k to 262k output ids) with the demo's 4096-id BPE tokenizer, made once under
``--work``: random weights are enough for speed and memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from harness import DEFAULT_WORK, best_time, peak_rss, small_corpus

from logitcache.native import library as native
from logitcache.targets.rng import row_keys
from logitcache.targets.rows import row_targets
from logitcache.targets.spec import TargetSpec

VOCABS = (2048, 32768, 128256, 262144)
SHAPE = {"hidden_size": 640, "num_hidden_layers": 18, "num_attention_heads": 10, "intermediate_size": 2048}
TOKENIZER_IDS = 4096


# ---- inputs -------------------------------------------------------------------------------


def peaked_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``[rows, vocab] float32`` logits whose softmax is Zipf-like (p ∝ rank^-1.1, times noise), each row
    in its own random id order: a peaked distribution as a language model's, not a uniform one."""
    g = torch.Generator().manual_seed(seed)
    zipf = -1.1 * torch.log1p(torch.arange(vocab, dtype=torch.float32)) + 0.5 * torch.randn(rows, vocab, generator=g)
    order = torch.argsort(torch.rand(rows, vocab, generator=g), dim=1)
    return torch.gather(zipf, 1, order).contiguous()


def vocab_teacher(work: Path, vocab: int) -> tuple[Path, Path]:
    """(teacher, corpus): a random-initialised Llama of :data:`SHAPE` with ``vocab`` output ids and the demo's
    ``TOKENIZER_IDS``-id tokenizer (fewer ids than the head), made under ``work`` once and reused."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from logitcache.demo import stdlib_docstrings, train_tokenizer, write_corpus

    teacher, corpus, tokenizer_dir = work / f"teacher-{vocab}", work / "corpus.jsonl", work / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file() or not corpus.is_file():
        docs = list(stdlib_docstrings())
        write_corpus(corpus, iter(docs))
        train_tokenizer(docs, TOKENIZER_IDS, tokenizer_dir)
    if not (teacher / "config.json").is_file():
        print(f"making a random teacher with {vocab} ids under {teacher}...", file=sys.stderr, flush=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        config = LlamaConfig(vocab_size=vocab, num_key_value_heads=SHAPE["num_attention_heads"], max_position_embeddings=1024,
                             tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **SHAPE)
        torch.manual_seed(0)
        shutil.rmtree(teacher, ignore_errors=True)
        LlamaForCausalLM(config).save_pretrained(str(teacher))
        tokenizer.save_pretrained(str(teacher))
    return teacher, corpus


# ---- target extraction against one pass -----------------------------------------------------


def targets_table(vocabs: list[int], rows: int) -> list[str]:
    """Rows/s of ``row_targets`` (raw logits in, the build's per-row targets out) and of one
    ``torch.logsumexp`` pass over the same logits, on one thread by the thread-CPU clock."""
    out = ["| vocab | one pass (`torch.logsumexp`) rows/s | topk k=32 rows/s | topk / one pass (time) | "
           "sample N=50 rows/s | sample / one pass (time) |", "|---:|---:|---:|---:|---:|---:|"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread-CPU clock: torch's own worker threads would go uncounted
    try:
        for vocab in vocabs:
            logits = peaked_logits(rows, vocab)
            labels = torch.arange(rows) % vocab
            keys = row_keys(0, torch.zeros(rows, dtype=torch.long), torch.arange(rows))
            one_pass = best_time(partial(torch.logsumexp, logits, -1), clock=time.thread_time)
            cells = [f"{rows / one_pass:,.0f}"]
            for method in ("topk", "sample"):
                seconds = best_time(partial(row_targets, logits, labels, keys, TargetSpec(method, k=32, samples=50)),
                                    clock=time.thread_time)
                cells += [f"{rows / seconds:,.0f}", f"{seconds / one_pass:.2f}"]
            out.append(f"| {vocab:,} | {' | '.join(cells)} |")
    finally:
        torch.set_num_threads(threads)
    return out


# ---- rows per head chunk ------------------------------------------------------------------


def chunks_table(work: Path, vocabs: list[int], chunk_rows: list[int], windows: int, seq_len: int) -> list[str]:
    """Tokens/s of the build's head + targets (``targets_from_hidden``) on one thread, thread-CPU clock, as
    the rows per chunk grow: the teacher's final hidden states of ``windows`` random-id windows."""
    from logitcache.build.settings import BuildSettings
    from logitcache.teacher.host import targets_from_hidden
    from logitcache.teacher.load import load_teacher

    out = ["| vocab | rows per chunk | chunk memory, topk (MiB) | topk k=32 tokens/s | sample N=50 tokens/s |",
           "|---:|---:|---:|---:|---:|"]
    threads = torch.get_num_threads()
    for vocab in vocabs:
        teacher_dir, corpus = vocab_teacher(work, vocab)
        teacher = load_teacher(teacher_dir, BuildSettings(teacher=teacher_dir, corpus=corpus, out=work / "unused").teacher_options())
        ids = torch.randint(0, TOKENIZER_IDS, (windows, seq_len), generator=torch.Generator().manual_seed(0))
        hidden = teacher.hidden_states(ids)[:, :-1]
        sequence_ids = torch.arange(windows).numpy()
        tokens = hidden.shape[0] * hidden.shape[1]
        torch.set_num_threads(1)
        try:
            for rows in chunk_rows:
                cells = []
                for spec in (TargetSpec("topk", k=32), TargetSpec("sample", samples=50)):
                    run = partial(targets_from_hidden, hidden, ids, sequence_ids, teacher.head, spec, rows)
                    cells.append(f"{tokens / best_time(run, repeat=1, clock=time.thread_time):,.0f}")  # after a warm-up
                out.append(f"| {vocab:,} | {rows} | {rows * vocab * 12 / 2**20:,.0f} | {' | '.join(cells)} |")
                print(out[-1], file=sys.stderr, flush=True)
        finally:
            torch.set_num_threads(threads)
        del teacher, hidden
    return out


# ---- whole processes: the build against the bare forward --------------------------------------


def child_build(cli_args: list[str]) -> None:
    """``python -m logitcache build CLI_ARGS`` in this process; prints its peak RSS in bytes."""
    from logitcache.cli import app

    try:
        app(["build", *cli_args], prog_name="logitcache")
    except SystemExit as exc:
        if exc.code:
            raise
    print(peak_rss())


def child_forward(case: dict) -> None:
    """The bare forward a user would write: load the model, ``model(ids).logits.log_softmax(-1)`` over the
    windows ``[n, seq_len] int64`` saved in ``case["windows"]``, ``case["batch"]`` at a time; prints peak RSS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(case["teacher"], dtype=torch.float32, local_files_only=True).eval()
    windows = np.load(case["windows"])
    with torch.inference_mode():
        for start in range(0, len(windows), case["batch"]):
            model(input_ids=torch.from_numpy(windows[start : start + case["batch"]])).logits.log_softmax(-1)
    print(peak_rss())


def timed_child(*args: str) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, peak RSS bytes) of this script run as a fresh process in a child mode.

    CPU seconds (user + system, the child's and its threads') are steadier than wall time on a shared
    machine; both processes keep the cores busy, so on an idle machine the two rank them alike."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)[:300]} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu, int(done.stdout.split()[-1])


def build_windows(cache: Path) -> np.ndarray:
    """The windows ``[n, seq_len] int64`` of a finished build, in build order."""
    from logitcache.cache.format import read_shard

    manifest = json.loads((cache / "manifest.json").read_text())
    return np.concatenate([read_shard(cache / s["file"]).input_ids for s in manifest["shards"]]).astype(np.int64)


def build_table(args) -> list[str]:
    """Whole-process wall time and peak RSS: bare forward and builds (default chunks, then each of
    ``--build-chunk-mib``), rounds interleaved, medians; a run on about one batch of the corpus gives its start-up."""
    out = ["| vocab | process | tokens | median wall (s) | tokens/s | ratio to bare forward (wall) | median CPU (s) | "
           "ratio to bare forward (CPU) | start-up share (wall) | peak RSS (MiB) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for vocab in (int(v) for v in args.build_vocabs.split(",")):
        teacher, corpus = vocab_teacher(args.work, vocab)
        run = args.work / f"run-{vocab}"
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        corpora = {"full": small_corpus(corpus, run / "full.jsonl", args.build_bytes),
                   "one": small_corpus(corpus, run / "one.jsonl", args.build_bytes // args.build_batches)}
        common = ["--teacher", str(teacher), "--method", args.method, "--seq-len", str(args.seq_len),
                  "--batch-size", str(args.batch_size), "--overwrite"]
        builds = {"build, default chunks": []} | {f"build, --chunk-mib {mib}": ["--chunk-mib", mib]
                                                  for mib in args.build_chunk_mib.split(",") if mib}
        seconds = {(name, size, clock): [] for name in ["bare forward", *builds] for size in corpora for clock in ("wall", "cpu")}
        peaks, tokens = {}, {}
        for round_ in range(args.build_rounds):
            for size, text in corpora.items():
                cases = {name: ("--child-build", *common, "--corpus", str(text), "--out", str(run / f"cache-{size}"), *extra)
                         for name, extra in builds.items()}
                cases["bare forward"] = ("--child-forward", json.dumps({"teacher": str(teacher), "batch": args.batch_size,
                                                                       "windows": str(run / f"windows-{size}.npy")}))
                for name, child in cases.items():  # the default build first: its windows feed the bare forward
                    shutil.rmtree(run / f"cache-{size}", ignore_errors=True)  # else the build resumes a finished one
                    wall, cpu, peaks[name, size] = timed_child(*child)
                    seconds[name, size, "wall"].append(wall)
                    seconds[name, size, "cpu"].append(cpu)
                    print(f"{vocab} {name} {size}: {wall:.1f} s wall, {cpu:.1f} s CPU", file=sys.stderr, flush=True)
                    if round_ == 0 and name == "build, default chunks":
                        windows = build_windows(run / f"cache-{size}")
                        np.save(run / f"windows-{size}.npy", windows)
                        tokens[size] = windows.size
        median = {key: statistics.median(values) for key, values in seconds.items()}
        for name in ["bare forward", *builds]:
            full, one = median[name, "full", "wall"], median[name, "one", "wall"]
            start_up = one - tokens["one"] * (full - one) / (tokens["full"] - tokens["one"])  # less its tokens' share
            out.append(f"| {vocab:,} | {name} | {tokens['full']:,} | {full:.1f} | {tokens['full'] / full:,.0f} | "
                       f"{median['bare forward', 'full', 'wall'] / full:.2f} | {median[name, 'full', 'cpu']:.0f} | "
                       f"{median['bare forward', 'full', 'cpu'] / median[name, 'full', 'cpu']:.2f} | {start_up / full:.1%} | "
                       f"{peaks[name, 'full'] / 2**20:,.0f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="targets,chunks,build", help="which tables to print, comma-separated")
    parser.add_argument("--vocabs", default=",".join(map(str, VOCABS)), help="targets table: the vocabularies")
    parser.add_argument("--target-rows", type=int, default=256, help="targets table: rows per call")
    parser.add_argument("--chunk-vocabs", default="128256,262144", help="chunks table: the teachers' vocabularies")
    parser.add_argument("--chunk-rows", default="5,10,16,32,64,128,256,512", help="chunks table: rows per head chunk")
    parser.add_argument("--chunk-windows", type=int, default=4, help="chunks table: windows of --seq-len tokens")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (chunks and build tables)")
    parser.add_argument("--build-vocabs", default="128256,262144", help="build table: the teachers' vocabularies")
    parser.add_argument("--build-bytes", type=int, default=110_000, help="build table: corpus bytes per build")
    parser.add_argument("--build-batches", type=int, default=30,
                        help="build table: the start-up run builds over 1/this of --build-bytes (about one batch)")
    parser.add_argument("--build-chunk-mib", default="16", help="build table: --chunk-mib values built besides the default")
    parser.add_argument("--build-rounds", type=int, default=3, help="build table: interleaved rounds; medians kept")
    parser.add_argument("--method", default="topk", help="build table: the build's --method")
    parser.add_argument("--batch-size", type=int, default=4, help="build table: windows per forward (build and bare)")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK / "vocab", help="where the random teachers are made and kept")
    parser.add_argument("--child-build", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--child-forward", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_build is not None:
        return child_build(args.child_build)
    if args.child_forward:
        return child_forward(json.loads(args.child_forward))
    if not native.library():
        raise SystemExit("no C compiler: the compiled target kernels, which this benchmark measures, are unavailable")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    tables = set(args.tables.split(","))
    if "targets" in tables:
        vocabs = [int(v) for v in args.vocabs.split(",")]
        print("\n## Target extraction against one pass over the logits\n\n" + "\n".join(targets_table(vocabs, args.target_rows)),
              flush=True)
    if "chunks" in tables:
        table = chunks_table(args.work, [int(v) for v in args.chunk_vocabs.split(",")],
                             [int(r) for r in args.chunk_rows.split(",")], args.chunk_windows, args.seq_len)
        print("\n## Output head + targets by rows per chunk (one thread)\n\n" + "\n".join(table), flush=True)
    if "build" in tables:
        print("\n## Whole build against the bare forward\n\n" + "\n".join(build_table(args)), flush=True)


if __name__ == "__main__":
    main()
