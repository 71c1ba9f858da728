"""logitcache against the script a user would write: caching teacher targets, and one student step.

    python3 benchmarks/bench_baseline.py --teacher demo-out/teacher-run/student --corpus demo-out/corpus.jsonl
    python3 benchmarks/bench_baseline.py --vocab 32768      # + a random-init teacher with a 32k head

Same corpus (the first ``--corpus-bytes`` of it), same teacher, same windows (``--seq-len``,
packed by ``logitcache.corpus``), same batch size:

(a) logitcache: ``run_build`` with ``topk`` k=32 and ``sample`` N=50;
(b) the naive script: ``model(ids).logits`` on the whole batch, ``log_softmax``, ``torch.topk(k=32)``,
    ``.tolist()`` into Python lists, rows in axolotl's KD layout (``input_ids``,
    ``target_token_ids: list<list<int64>>``, ``target_logprobs: list<list<float32>>``,
    ``target_mask: list<list<int64>>``) written every 512 windows to Parquet with pyarrow's
    defaults (snappy, dictionary), or to JSON Lines (``json.dumps`` per window);
(c) one student training step (forward, loss, backward, AdamW) on ``--batch-size`` windows:
    dense KL(teacher || student) over the whole vocabulary with the teacher run in the step
    (online KD) or with its full log-probs already in memory (a full-logit cache), against
    logitcache's sparse losses on batches from the caches of (a): ``rs-kd`` (sample) and
    ``topk-renorm`` (topk), plain (``model(ids).logits`` + ``logitcache.losses.sparse``) and fused
    (``logitcache.losses.fused.fused_loss``: no ``[B, P, V]`` logits).
    Step time excludes loading the batch (see benchmarks/bench_loader.py for the loader).

Every case runs in a fresh subprocess; peak memory is that process's peak RSS (VmHWM of
/proc/self/status) over its whole life, teacher or student load included; "resting RSS" is its RSS
just before the timed work: (a) and (b) once the teacher is loaded, (c) after two warm-up steps. Tokens/s of (a) and (b) cover
tokenization, teacher, target extraction and writing (model loading excluded). ``--clock cpu``
counts the process's CPU seconds instead of wall seconds (every thread, so logitcache's
background shard writer is charged in full); with ``--threads 1`` it is the steady measure on a
busy machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from pathlib import Path

from harness import CLOCKS, ensure_teacher, peak_rss, rss, run_fresh, small_corpus, teacher_arguments

SHARD_WINDOWS = 512
K, SAMPLES = 32, 50


# ---- cases (each runs in its own process) ----------------------------------------------------


def windows_of(teacher_dir: Path, corpus: Path, seq_len: int):
    """(tokenizer, [W, n] int64 windows) exactly as ``logitcache build`` packs the corpus."""
    import numpy as np

    from logitcache.corpus import Corpus, PackingStats, pack_windows, token_stream
    from logitcache.teacher.folder import load_tokenizer

    tok = load_tokenizer(teacher_dir)
    stats = PackingStats()
    tokens = token_stream(Corpus.open(corpus, "text").documents(), tok, tok.eos_token_id, stats)
    return tok, np.stack(list(pack_windows(tokens, seq_len, stats))).astype(np.int64)


def case_build(c: dict) -> dict:
    from logitcache.build.run import run_build
    from logitcache.build.settings import BuildSettings
    from logitcache.teacher.load import load_teacher

    extra = {"k": K} if c["method"] == "topk" else {"samples": SAMPLES}
    settings = BuildSettings(teacher=Path(c["teacher"]), corpus=Path(c["corpus"]), out=Path(c["out"]), method=c["method"],
                             seq_len=c["seq_len"], batch_size=c["batch"], shard_size=SHARD_WINDOWS, overwrite=True,
                             packing="stream", **extra)  # the same windows as the naive loop's
    teacher = load_teacher(settings.teacher, settings.teacher_options())
    resting, clock = rss(), CLOCKS[c["clock"]]
    start = clock()
    manifest = run_build(settings, teacher=teacher)
    seconds = clock() - start
    totals = manifest["totals"]
    return {"tokens": totals["tokens"], "seconds": seconds, "bytes": totals["bytes"], "resting_rss": resting}


def case_naive(c: dict) -> dict:
    """What a user writes: full logits, topk, .tolist(), axolotl-layout rows, Parquet or JSON Lines."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(c["teacher"], dtype=torch.float32, local_files_only=True).eval()
    out = Path(c["out"])
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([
        ("input_ids", pa.list_(pa.int64())),
        ("target_token_ids", pa.list_(pa.list_(pa.int64()))),
        ("target_logprobs", pa.list_(pa.list_(pa.float32()))),
        ("target_mask", pa.list_(pa.list_(pa.int64()))),
    ])  # fmt: skip
    resting, clock = rss(), CLOCKS[c["clock"]]
    start = clock()
    _, windows = windows_of(Path(c["teacher"]), Path(c["corpus"]), c["seq_len"])
    rows, files, shard = [], [], 0

    def flush():
        nonlocal rows, shard
        if not rows:
            return
        if c["format"] == "parquet":
            path = out / f"shard-{shard:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        else:
            path = out / f"shard-{shard:05d}.jsonl"
            with open(path, "w") as f:
                for row in rows:
                    f.write(json.dumps(row) + "\n")
        files.append(path)
        rows, shard = [], shard + 1

    with torch.inference_mode():
        for i in range(0, len(windows), c["batch"]):
            ids = torch.from_numpy(windows[i : i + c["batch"]])
            logits = model(ids).logits[:, :-1]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            values, indices = torch.topk(logprobs, K, dim=-1)
            for window, lp, idx in zip(ids.tolist(), values.tolist(), indices.tolist()):
                rows.append({"input_ids": window, "target_token_ids": idx, "target_logprobs": lp,
                             "target_mask": [[1] * K for _ in idx]})
                if len(rows) == SHARD_WINDOWS:
                    flush()
    flush()
    seconds = clock() - start
    written = sum(p.stat().st_size for p in files)
    return {"tokens": int(windows.size), "seconds": seconds, "bytes": written, "resting_rss": resting}


def _student(c: dict, vocab: int):
    import torch

    from logitcache.train.student import build_student

    torch.manual_seed(0)
    return build_student(preset=c["student"], config_file=None, init_from=None, vocab_size=vocab,
                         max_positions=c["seq_len"], eos_token_id=0)


def case_step(c: dict) -> dict:
    """One training step, repeated; the batch is ready in memory (loading not timed)."""
    import torch

    from logitcache.loader.dataset import CacheDataset

    path = c["path"]
    cache = Path(c["cache_topk"] if c["loss"] == "topk-renorm" else c["cache_sample"])
    dataset = CacheDataset(cache, seed=0, global_batch_size=c["batch"], shuffle=False, rank=0, world_size=1)
    batches = list(itertools.islice(iter(dataset.dataloader()), 2))
    vocab = dataset.manifest["vocab_size"]
    student = _student(c, vocab)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    teacher = teacher_logprobs = None
    if path.startswith("dense"):
        from transformers import AutoModelForCausalLM

        teacher = AutoModelForCausalLM.from_pretrained(c["teacher"], dtype=torch.float32, local_files_only=True).eval()
        if path == "dense-cached":  # what a full-logit cache would hand the step: [B, P, V] float32 teacher log-probs
            with torch.inference_mode():
                teacher_logprobs = [torch.log_softmax(teacher(b["input_ids"]).logits[:, :-1].float(), -1) for b in batches]
            teacher = None
    else:
        from logitcache.losses.sparse import get_loss

        loss_fn = get_loss(c["loss"])
        if path == "fused":
            from logitcache.losses.fused import fused_loss

    def step(i: int) -> None:
        batch = batches[i % len(batches)]
        ids = batch["input_ids"]
        if path.startswith("dense"):
            if teacher is not None:
                with torch.no_grad():
                    t = torch.log_softmax(teacher(ids).logits[:, :-1].float(), -1)
            else:
                t = teacher_logprobs[i % len(batches)]
            s = torch.log_softmax(student(ids).logits[:, :-1].float(), -1)
            mask = batch["position_mask"]  # masked after the per-position KL: no [rows, V] copies
            per_position = torch.nn.functional.kl_div(s, t, log_target=True, reduction="none").sum(-1)
            loss = per_position[mask].sum() / mask.sum()
        elif path == "fused":
            hidden = student.model(input_ids=ids).last_hidden_state[:, :-1]
            loss = fused_loss(c["loss"], hidden, student.lm_head.weight, batch).mean()
        else:
            loss = loss_fn(student(ids).logits[:, :-1], batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(c["warmup"]):
        step(i)
    resting, clock = rss(), CLOCKS[c["clock"]]
    start = clock()
    for i in range(c["steps"]):
        step(i)
    seconds = clock() - start
    tokens = c["steps"] * int(batches[0]["input_ids"].numel())
    return {"tokens": tokens, "seconds": seconds, "bytes": None, "resting_rss": resting}


CASES = {"build": case_build, "naive": case_naive, "step": case_step}


def run_case(c: dict, threads: int) -> dict:
    """Run one case in a fresh interpreter; its result plus its peak RSS."""
    env = {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    out = run_fresh(__file__, "--case", json.dumps(c), "--threads", str(threads), env=env)
    return json.loads([line for line in out.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])


# ---- driver --------------------------------------------------------------------------------


def random_teacher(source: Path, out: Path, vocab: int, preset: str) -> Path:
    """A random-initialised Llama with a ``vocab``-row head and ``source``'s tokenizer (for memory scaling)."""
    from logitcache.demo import make_model

    if not (out / "config.json").is_file():
        make_model(source, out, preset=preset, max_positions=1024, vocab_size=vocab)
    return out


def mib(size: int) -> str:
    return f"{size / 2**20:,.0f}"


def report(teacher: Path, corpus: Path, work: Path, args, label: str) -> None:
    base = {"teacher": str(teacher), "corpus": str(corpus), "seq_len": args.seq_len, "batch": args.batch_size, "clock": args.clock}
    rows = ["| cache writer | tokens/s | bytes/token | peak RSS MiB | resting RSS MiB |", "|---|---:|---:|---:|---:|"]
    builds = [
        (f"logitcache `run_build` topk k={K}", {"kind": "build", "method": "topk", "out": str(work / "cache-topk")}),
        (f"logitcache `run_build` sample N={SAMPLES}", {"kind": "build", "method": "sample", "out": str(work / "cache-sample")}),
        (f"naive: logits → topk k={K} → `.tolist()` → Parquet (axolotl layout)", {"kind": "naive", "format": "parquet", "out": str(work / "naive-parquet")}),
        (f"naive: logits → topk k={K} → `.tolist()` → JSON Lines", {"kind": "naive", "format": "jsonl", "out": str(work / "naive-jsonl")}),
    ]  # fmt: skip
    for name, extra in builds:
        r = run_case({**base, **extra}, args.threads)
        rows.append(f"| {name} | {r['tokens'] / r['seconds']:,.0f} | {r['bytes'] / r['tokens']:,.1f} | "
                    f"{mib(r['peak_rss'])} | {mib(r['resting_rss'])} |")
        print(rows[-1], file=sys.stderr, flush=True)
    vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
    rows.append(f"| (full-logit cache for the dense step below: float32, not written) | — | {4 * vocab:,} | — | — |")
    print(f"\n## Caching the teacher ({label})\n\n" + "\n".join(rows))

    steps = [
        ("dense KL, teacher run in the step (online KD)", "dense-online", "kl"),
        ("dense KL, teacher full log-probs in memory (full-logit cache)", "dense-cached", "kl"),
        ("logitcache sparse `rs-kd` (sample cache), plain", "plain", "rs-kd"),
        ("logitcache sparse `topk-renorm` (topk cache), plain", "plain", "topk-renorm"),
        ("logitcache sparse `rs-kd`, fused head+loss", "fused", "rs-kd"),
        ("logitcache sparse `topk-renorm`, fused head+loss", "fused", "topk-renorm"),
    ]
    rows = ["| student step (forward, loss, backward, AdamW) | tokens/s | ms/step | peak RSS MiB | resting RSS MiB |",
            "|---|---:|---:|---:|---:|"]
    for name, path, loss in steps:
        c = {**base, "kind": "step", "path": path, "loss": loss, "student": args.student, "steps": args.steps,
             "warmup": 2, "cache_topk": str(work / "cache-topk"), "cache_sample": str(work / "cache-sample")}
        r = run_case(c, args.threads)
        rows.append(f"| {name} | {r['tokens'] / r['seconds']:,.0f} | {1000 * r['seconds'] / args.steps:,.0f} | "
                    f"{mib(r['peak_rss'])} | {mib(r['resting_rss'])} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(f"\n## One student step, {args.batch_size} × {args.seq_len} tokens, student `{args.student}` ({label})\n\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher_arguments(parser, corpus_bytes=200_000)
    parser.add_argument("--student", default="nano", help="student preset (logitcache.train.student.MODEL_PRESETS)")
    parser.add_argument("--steps", type=int, default=10, help="timed student steps (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every case")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or process CPU time (use with --threads 1 on a shared machine)")
    parser.add_argument("--vocab", type=int, nargs="*", default=[],
                        help="also run with a random-initialised micro teacher of this head size (memory scaling)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        import torch

        torch.set_num_threads(args.threads)
        c = json.loads(args.case)
        result = CASES[c["kind"]](c)
        result["peak_rss"] = peak_rss()
        print("RESULT " + json.dumps(result), flush=True)
        return

    import torch

    teacher, corpus = ensure_teacher(args.teacher, args.corpus, args.work)
    print(f"torch {torch.__version__}, {args.threads} threads per case, cpu, {args.clock} clock; "
          f"corpus {args.corpus_bytes:,} bytes of {corpus}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = small_corpus(corpus, work / "bench.jsonl", args.corpus_bytes)
        vocab = json.loads((teacher / "config.json").read_text())["vocab_size"]
        report(teacher, small, work / "trained", args, f"trained teacher {teacher}, vocab {vocab}")
        for v in args.vocab:
            big = random_teacher(teacher, work / f"teacher-{v}", v, "micro")
            report(big, small, work / f"vocab-{v}", args, f"random-init micro teacher, vocab {v}")


if __name__ == "__main__":
    main()
