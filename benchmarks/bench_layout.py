"""Document isolation two ways: a row per document (``--packing documents``, what logitcache does) against
packed windows with a block-diagonal mask (documents packed, position ids restarting per document).

    python3 benchmarks/bench_layout.py [--teacher DIR --corpus FILE | --bos-teacher] [--corpus-bytes 400000] [--rounds 2]

1. Storage and padding, on a pretrained teacher (``--teacher``, default the demo's) and its corpus: the same
   corpus built as ``documents`` and as ``stream`` (``stream`` stores what block-diagonal packing
   would: the same tokens in full windows): bytes per token; the teacher's padding under
   ``documents`` (tokens computed / real tokens, batches cut longest first per shard, as the build
   does); the student's useful-token fraction (tokens / batch cells) of random loader batches, padded
   and packed (``--pack``, several rows to a student row).
2. Speed, on a random-initialised Llama of more realistic shape (hidden 256, 4 layers, 32k ids):
   the bare forward ``model(ids).logits`` over the same documents (a) as length-sorted padded rows,
   (b) packed into full windows with position ids restarting at each document (transformers turns
   that into a block-diagonal mask), (c) packed without isolation (the speed ceiling); then whole
   ``run_build`` calls for ``documents`` and ``stream``. Fastest of ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import ensure_teacher, fastest, small_corpus, teacher_arguments

from logitcache.build.pipeline import pieces_of
from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.manifest import read_manifest
from logitcache.corpus import Corpus, PackingStats, layout_rows, pad_rows, resolve_layout
from logitcache.loader.collate import pack_batch
from logitcache.loader.dataset import CacheDataset
from logitcache.teacher.folder import load_tokenizer
from logitcache.teacher.load import load_teacher


def bos_teacher(work: Path) -> tuple[Path, Path]:
    """(teacher, corpus): ``tests/test_layout.py``'s teacher, made under ``work`` if missing: the demo recipe with
    a BOS-adding tokenizer (512 ids, "nano"), 300 CE steps on the first 300 stdlib docstrings, windows of 64."""
    import itertools

    from logitcache.demo import TeacherSizes, make_teacher, pretraining, stdlib_docstrings, write_corpus
    from logitcache.train.loop import run_train

    folder = work / "bos-teacher"
    teacher = folder / "teacher-run" / "student"
    if not (teacher / "config.json").is_file():
        documents = list(itertools.islice(stdlib_docstrings(), 300))
        write_corpus(folder / "corpus.jsonl", iter(documents))
        make_teacher(folder, documents, TeacherSizes(512, "nano", max_positions=128, bos=True))
        shutil.rmtree(folder / "teacher-run", ignore_errors=True)
        run_train(pretraining(folder, 300, seq_len=64, eval_every=0))
    return teacher, folder / "corpus.jsonl"


def rows_of(teacher: Path, corpus: Path, packing: str, seq_len: int) -> list[np.ndarray]:
    tok = load_tokenizer(teacher)
    return list(layout_rows(Corpus.open(corpus).documents(), tok, resolve_layout(tok, "auto", packing), seq_len, PackingStats()))


def teacher_padding(rows: list[np.ndarray], batch: int, shard: int) -> float:
    """Tokens the teacher computes per real token, batches cut as the build cuts them (longest first per shard)."""
    pieces = pieces_of(iter(rows), shard, batch, batch * max(len(r) for r in rows))
    computed = sum(len(part) * max(len(r) for r in part) for _, part, _, _ in pieces)
    return computed / sum(len(r) for r in rows)


def storage_table(args, work: Path) -> list[str]:
    teacher, corpus = bos_teacher(args.work) if args.bos_teacher else ensure_teacher(args.teacher, args.corpus, args.work)
    corpus = small_corpus(corpus, work / "bench.jsonl", args.corpus_bytes)
    docs = rows_of(teacher, corpus, "documents", args.seq_len)
    lengths = np.array([len(r) for r in docs])
    print(f"teacher {teacher}, {len(docs)} document rows of median {int(np.median(lengths))} tokens "
          f"(max {args.seq_len}); teacher padding under documents: {teacher_padding(docs, args.batch_size, 512):.3f}x")
    out = ["| method | packing | rows | bytes/token | bytes/entry | student useful tokens, batch 16: padded | packed |",
           "|---|---|---:|---:|---:|---:|---:|"]
    teacher_obj = None
    for method, extra in (("topk", {"k": 32}), ("sample", {"samples": 50})):
        for packing in ("documents", "stream"):
            settings = BuildSettings(teacher=teacher, corpus=corpus, out=work / f"{method}-{packing}", method=method,
                                     seq_len=args.seq_len, batch_size=args.batch_size, shard_size=512, overwrite=True,
                                     packing=packing, **extra)
            teacher_obj = teacher_obj or load_teacher(settings.teacher, settings.teacher_options())
            manifest = run_build(settings, teacher=teacher_obj)
            totals = manifest["totals"]
            padded, packed = [], []
            for batch in CacheDataset(settings.out, seed=0, global_batch_size=16).dataloader():
                for useful, rows in ((padded, batch), (packed, pack_batch(batch))):
                    useful.append(float(rows["token_counts"].sum()) / rows["input_ids"].numel())
            out.append(f"| {method} | {packing} | {totals['sequences']} | {totals['bytes'] / totals['tokens']:.1f} | "
                       f"{totals['bytes'] / totals['target_entries']:.2f} | {np.mean(padded):.3f} | {np.mean(packed):.3f} |")
    return out


def random_teacher(folder: Path, tokenizer_dir: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(tokenizer_dir)
    config = LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def packed_positions(windows: list[np.ndarray], eos: int) -> list[np.ndarray]:
    """Position ids restarting after every EOS: the block-diagonal mask transformers builds from them."""
    out = []
    for window in windows:
        starts = np.flatnonzero(np.concatenate([[True], window[:-1] == eos]))
        out.append(np.arange(len(window)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(window)]]))))
    return out


def speed_table(args, work: Path) -> list[str]:
    teacher, corpus = bos_teacher(args.work) if args.bos_teacher else ensure_teacher(args.teacher, args.corpus, args.work)
    corpus = small_corpus(corpus, work / "speed.jsonl", args.corpus_bytes // 2)
    model_dir = random_teacher(work / "llama-32k", teacher)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    seq_len, batch = 512, 8
    docs = rows_of(model_dir, corpus, "documents", seq_len)
    windows = rows_of(model_dir, corpus, "stream", seq_len)
    positions = packed_positions(windows, load_tokenizer(model_dir).eos_token_id)
    real = sum(len(r) for r in docs)
    sorted_batches = [pad_rows(part)[0] for _, part, _, _ in pieces_of(iter(docs), 512, batch, batch * seq_len)]

    @torch.inference_mode()
    def forward(batches, with_positions=None):
        def run():
            for i, ids in enumerate(batches):
                kwargs = {} if with_positions is None else {"position_ids": torch.from_numpy(with_positions[i])}
                model(input_ids=torch.from_numpy(ids), **kwargs).logits.log_softmax(-1)
        return run

    window_batches = [np.stack(windows[i : i + batch]) for i in range(0, len(windows), batch)]
    position_batches = [np.stack(positions[i : i + batch]) for i in range(0, len(windows), batch)]
    cases = {
        "documents: a row per document, longest first, batches of 8 x 512 tokens": forward(sorted_batches),
        "packed windows, block-diagonal (position ids restart)": forward(window_batches, position_batches),
        "packed windows, no isolation (ceiling)": forward(window_batches),
    }
    times = fastest(cases, args.rounds)
    out = [f"random Llama hidden 256, 4 layers, 32,768 ids, seq_len {seq_len}, batch {batch}; {real} real tokens "
           f"({len(docs)} documents rows, {len(windows)} packed windows)", "",
           "| bare forward | tokens/s (real tokens) | vs documents |", "|---|---:|---:|"]
    for name, seconds in times.items():
        out.append(f"| {name} | {real / seconds:,.0f} | {times[next(iter(times))] / seconds:.2f} |")
    builds = {}
    loaded = load_teacher(model_dir, BuildSettings(teacher=model_dir, corpus=corpus, out=work / "x").teacher_options())
    for packing in ("documents", "stream"):
        settings = BuildSettings(teacher=model_dir, corpus=corpus, out=work / f"build-{packing}", seq_len=seq_len,
                                 batch_size=batch, shard_size=512, overwrite=True, packing=packing)
        def fresh(settings=settings):  # the same build again would resume (skip) the finished one
            shutil.rmtree(settings.out, ignore_errors=True)
            run_build(settings, teacher=loaded)

        builds[f"run_build --packing {packing}"] = fresh
    build_times = fastest(builds, args.rounds)
    out += ["", "| whole build (topk k=32) | tokens/s | bytes/token |", "|---|---:|---:|"]
    for name, seconds in build_times.items():
        totals = read_manifest(work / f"build-{name.split()[-1]}")["totals"]
        out.append(f"| {name} | {totals['tokens'] / seconds:,.0f} | {totals['bytes'] / totals['tokens']:.1f} |")
    return out


def contexts_table(args, work: Path) -> list[str]:
    """The BOS teacher's perplexity on the documents that fit a row: cached with the defaults, cached as a
    BOS-less stream, and by plain transformers one document at a time (``tests/test_layout.py`` bounds these)."""
    import math

    from transformers import AutoModelForCausalLM

    from logitcache.cache.summary import summarize
    from logitcache.demo import write_corpus
    from logitcache.teacher.folder import load_tokenizer

    teacher, corpus = bos_teacher(args.work)
    tok = load_tokenizer(teacher)
    docs = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    docs = [d for d in docs if len(tok(d)["input_ids"]) + 1 <= 64]
    write_corpus(work / "short.jsonl", iter(docs))
    model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32).eval()
    nll = count = 0
    with torch.inference_mode():
        for doc in docs:
            ids = torch.tensor([tok(doc)["input_ids"] + [tok.eos_token_id]])
            logprobs = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])
            nll, count = nll - float(logprobs.sum()), count + logprobs.numel()
    out = [f"BOS teacher, {len(docs)} documents that fit 64 tokens with their BOS and EOS", "",
           "| how the teacher saw them | perplexity | positions 0-31 | positions 32+ |", "|---|---:|---:|---:|",
           f"| transformers, one document at a time | {math.exp(nll / count):.3f} | | |"]
    for name, options in (("cache, defaults (`--bos auto --packing documents`)", {}),
                          ("cache, `--bos never --packing stream`", {"bos": "never", "packing": "stream"})):
        settings = BuildSettings(teacher=teacher, corpus=work / "short.jsonl", out=work / f"contexts-{len(out)}",
                                 seq_len=64, overwrite=True, **options)
        run_build(settings)
        summary = summarize(settings.out)
        buckets = summary["teacher_perplexity_by_position"]
        out.append(f"| {name} | {summary['teacher_perplexity']:.3f} | {buckets.get('0-31', float('nan')):.2f} | "
                   f"{buckets.get('32-255', float('nan')):.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    teacher_arguments(parser)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", choices=("storage", "speed", "contexts"))
    parser.add_argument("--bos-teacher", action="store_true",
                        help="use (and make under --work) tests/test_layout.py's BOS teacher instead of --teacher")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.only == "contexts":
            print("\n".join(contexts_table(args, Path(tmp))), flush=True)
            return
        if args.only != "speed":
            print("\n".join(storage_table(args, Path(tmp))), "\n", flush=True)
        if args.only != "storage":
            print("\n".join(speed_table(args, Path(tmp))), flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
