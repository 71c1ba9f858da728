"""Student training-step time and peak memory: every loss plain and fused, CE and dense-logits KD.

    python3 benchmarks/bench_loss.py [--device cpu|cuda] [--preset nano] [--vocab 2048 32768]
                                     [--batch 8] [--seq-len 128] [--losses ce rs-kd ...] [--threads N]

One step is the forward and backward of a Llama student from ``logitcache.train.student.MODEL_PRESETS``
(optimizer excluded: it is the same for every loss; parameter gradients are set to None after
each step, so their allocation is inside the step). Paths:

- plain: ``model(input_ids).logits[:, :-1]`` (the ``[B, T, V]`` logits), then ``get_loss(name)``;
- fused: ``student_hidden(model, input_ids)[:, :-1]`` (the model's forward with
  ``output_hidden_states=True, logits_to_keep=1``) and ``lm_head.weight`` into
  ``logitcache.losses.fused.fused_loss`` (the logits exist one chunk of rows at a time);
- dense-logits KD: what users do without a cache: the teacher's full log-probs ``[B, P, V]`` are
  part of the batch and the loss is ``KL(teacher || softmax(student))`` over the vocabulary
  (the teacher's forward is not timed).

Sparse batches: top-k losses get the teacher's top ``--k`` ids with their tail; ``rs-kd`` gets
``--samples`` draws with replacement (distinct ids and counts). On CUDA the forward runs under
bf16 autocast, as ``logitcache train`` does.

Time: median over ``--steps`` steps after ``--warmup``, wall clock (``--clock cpu``: process CPU
time, steadier on a shared machine; use it with ``--threads 1``); with ``--rounds R`` every case
runs R times, interleaved, and the fastest median counts. Peak memory, of one step after warmup
(with ``--rounds R``: the median over R processes; RSS moves by ~0.5 MiB from one to the next),
is above the resting model, so it includes the batch (for dense KD, the dense target); "in-step"
is the same peak above the memory held just before the step (model and batch), i.e. what the
forward, loss and backward allocate. CPU: the peak RSS (VmHWM, reset through /proc/self/clear_refs,
with glibc's mmap threshold pinned at 64 KiB so that freed tensors leave RSS: not during timing,
where it would add page faults); CUDA: ``torch.cuda.max_memory_allocated``. Every measurement runs
in a fresh subprocess; ``--measure memory`` skips the timing.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from harness import CLOCKS, median_time, peak_rss, reset_peak_rss, rss, run_fresh

from logitcache.losses.fused import default_chunk_rows, fused_loss, student_hidden
from logitcache.losses.sparse import LOSSES, get_loss
from logitcache.train.student import MODEL_PRESETS, llama_config

DENSE = "dense-logits KD"


# ---- one case, in its own process -----------------------------------------------------------


def teacher_logprobs(b: int, p: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, P, V]`` float32 log-probs of a peaked random teacher (logits ~ N(0, 4²): about 16
    distinct ids in 50 draws at vocabulary 2048, 27 at 32768), on the generator's device."""
    logits = torch.randn(b, p, vocab, generator=generator, device=generator.device) * 4.0
    return logits.log_softmax(-1)


def sparse_batch(case: dict, device: str) -> dict[str, torch.Tensor]:
    """A collated batch (docs/CONTRACTS.md): top-k for the top-k losses, sampled ids for rs-kd."""
    b, p, vocab = case["batch"], case["seq_len"] - 1, case["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, vocab, (b, p + 1), generator=torch.Generator().manual_seed(0))
    position_mask = torch.ones(b, p, dtype=torch.bool)
    position_mask[0, p // 2 :] = False  # a padded window
    columns = {"target_ids": [], "target_logprobs": [], "target_weights": []}
    for _ in range(b):  # one window at a time: a dense [P, V] teacher never lives for the whole batch
        t = teacher_logprobs(1, p, vocab, g)[0]
        if case["loss"] == "rs-kd":
            draws = torch.multinomial(t.exp(), case["samples"], replacement=True, generator=g)
            counts = torch.zeros_like(t).scatter_add_(-1, draws, torch.ones_like(draws, dtype=torch.float32))
            ids = counts.argsort(-1, descending=True)[:, : int((counts > 0).sum(-1).max())]
            weights = counts.gather(-1, ids) / case["samples"]
        else:
            ids = t.topk(case["k"], -1).indices
            weights = t.gather(-1, ids).exp()
        columns["target_ids"].append(ids)
        columns["target_logprobs"].append(t.gather(-1, ids))
        columns["target_weights"].append(weights)
    width = max(ids.shape[-1] for ids in columns["target_ids"])
    pad = lambda x, value: F.pad(x, (0, width - x.shape[-1]), value=value)  # noqa: E731
    ids = torch.stack([pad(x, -1) for x in columns["target_ids"]])
    mask = ids >= 0
    logprobs = torch.stack([pad(x, 0.0) for x in columns["target_logprobs"]])
    mass = (logprobs.exp() * mask).sum(-1)
    batch = {
        "input_ids": input_ids,
        "labels": input_ids[:, 1:].contiguous(),
        "target_ids": ids.clamp_min(0),
        "target_mask": mask,
        "target_logprobs": logprobs,
        "target_weights": torch.stack([pad(x, 0.0) for x in columns["target_weights"]]),
        "tail_logprob": (1.0 - mass).clamp_min(0.0).log(),
        "position_mask": position_mask,
    }
    return {name: value.to(device) for name, value in batch.items()}


def dense_batch(case: dict, device: str) -> dict[str, torch.Tensor]:
    """Tokens and the teacher's full log-probs ``[B, P, V]`` (built on the device)."""
    b, p, vocab = case["batch"], case["seq_len"] - 1, case["vocab"]
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, vocab, (b, p + 1), generator=torch.Generator().manual_seed(0))
    position_mask = torch.ones(b, p, dtype=torch.bool)
    position_mask[0, p // 2 :] = False
    teacher = torch.cat([teacher_logprobs(1, p, vocab, g) for _ in range(b)])
    return {"input_ids": input_ids.to(device), "teacher_logprobs": teacher, "position_mask": position_mask.to(device)}


def make_step(case: dict, model, batch: dict, device: torch.device):
    """A closure running one forward + backward of the case's path."""
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    tokens = batch["position_mask"].sum()
    if case["path"] == "dense":

        def loss_fn():
            with autocast:
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            # KL per position over the whole batch, masked after the reduction: no [rows, V] copies.
            student = logits.float().log_softmax(-1)
            teacher = batch["teacher_logprobs"]
            per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
            return per_position[batch["position_mask"]].sum()

    elif case["path"] == "plain":
        loss = get_loss(case["loss"])

        def loss_fn():
            with autocast:
                logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            return loss(logits, batch).total

    else:

        def loss_fn():
            with autocast:
                hidden = student_hidden(model, batch["input_ids"])[:, :-1]
                out = fused_loss(case["loss"], hidden, model.lm_head.weight, batch, chunk_rows=case["chunk_rows"])
            return out.total

    def step():
        (loss_fn() / tokens).backward()
        model.zero_grad(set_to_none=True)

    return step


def make_student(case: dict):
    """The case's student (seed 0), on its device, in training mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(case["vocab"], case["preset"], max(1024, case["seq_len"]))).to(case["device"]).train()


def prepared_step(case: dict, model=None):
    """The step closure of the case on its model (made here unless given) and batch."""
    model = make_student(case) if model is None else model
    batch = dense_batch(case, case["device"]) if case["path"] == "dense" else sparse_batch(case, case["device"])
    return make_step(case, model, batch, torch.device(case["device"]))


def run_interleaved(cases: list[dict]) -> list[float]:
    """Milliseconds per step of each case, all in this process, one step of each in turn (rotating
    the order every round), so a slow spell on a shared machine hits every case alike."""
    if cases[0]["threads"]:
        torch.set_num_threads(cases[0]["threads"])
    cuda = cases[0]["device"] == "cuda"
    steps = [prepared_step(case) for case in cases]
    for step in steps:
        for _ in range(cases[0]["warmup"]):
            step()
    clock = CLOCKS[cases[0]["clock"]]
    times: list[list[float]] = [[] for _ in cases]
    for round_ in range(cases[0]["steps"]):
        for i in [(round_ + j) % len(cases) for j in range(len(cases))]:
            start = clock()
            steps[i]()
            if cuda:
                torch.cuda.synchronize()
            times[i].append(clock() - start)
    return [1e3 * statistics.median(t) for t in times]


def run_case(case: dict) -> float | tuple[float, float]:
    """Milliseconds per step (``case["measure"] == "time"``), or the peak MiB of a step above the
    resting model and above the memory held just before the step."""
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    model = make_student(case)  # resting: the model exists (and the libraries it needs are loaded)
    resting = torch.cuda.memory_allocated() if cuda else rss()
    step = prepared_step(case, model)
    for _ in range(case["warmup"]):
        step()
    if case["measure"] == "memory":
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            before = peak_rss()
        step()
        peak = torch.cuda.max_memory_allocated() if cuda else peak_rss()
        return (peak - resting) / 2**20, (peak - before) / 2**20
    return 1e3 * median_time(step, case["steps"], CLOCKS[case["clock"]], torch.cuda.synchronize if cuda else None)


# ---- the driver ----------------------------------------------------------------------------


def cases_for(args: argparse.Namespace, vocab: int) -> list[dict]:
    common = {
        "vocab": vocab, "preset": args.preset, "batch": args.batch, "seq_len": args.seq_len, "k": args.k,
        "samples": args.samples, "device": args.device, "threads": args.threads, "steps": args.steps,
        "warmup": args.warmup, "chunk_rows": args.chunk_rows, "clock": args.clock,
    }  # fmt: skip
    cases = []
    for name in args.losses:
        cases += [{**common, "loss": name, "path": "plain"}, {**common, "loss": name, "path": "fused"}]
    return cases + [{**common, "loss": DENSE, "path": "dense"}]


def spawn(case: dict, measure: str) -> list[float]:
    """``run_case`` in a fresh interpreter; for memory with glibc's mmap threshold pinned (freed tensors leave RSS)."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"} if measure == "memory" else None
    out = run_fresh(__file__, "--case", json.dumps({**case, "measure": measure}), env=env)
    return [float(x) for x in out.strip().splitlines()[-1].split()]


def table(vocab: int, args: argparse.Namespace, ms: dict, mib: dict) -> str:
    """One markdown table; a case missing from ``ms`` (``--measure memory``) or ``mib`` gets blank cells."""
    hidden = MODEL_PRESETS[args.preset][0]
    chunk = args.chunk_rows or default_chunk_rows(vocab, hidden, args.device)
    clock = "process CPU time" if args.clock == "cpu" else "wall time"
    lines = [
        f"{args.preset} (hidden {hidden}), vocab {vocab}, batch {args.batch}x{args.seq_len}, {args.device}, "
        f"fused chunk {chunk} rows; forward+backward, optimizer excluded; {clock}, median of {args.steps} steps",
        "",
        ("| loss | path | step ms | x CE plain | x CE fused | peak MiB | peak x CE plain | peak x CE fused "
         "| in-step MiB | in-step x CE fused |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cells(values: dict, key, i: int | None, plain, fused) -> str:
        if key not in values:
            return " | | "
        value = values[key] if i is None else values[key][i]
        ratios = [value / base for base in (plain, fused) if base is not None]
        return " | ".join([f"{value:.1f}", *(f"{r:.2f}" for r in ratios)])

    ce_ms = (ms.get(("ce", "plain")), ms.get(("ce", "fused")))
    ce_mib = [mib.get(("ce", p), [None, None]) for p in ("plain", "fused")]
    for key in dict.fromkeys([*ms, *mib]):
        lines.append(
            f"| {key[0]} | {key[1]} | {cells(ms, key, None, *ce_ms)} | {cells(mib, key, 0, ce_mib[0][0], ce_mib[1][0])} | "
            f"{cells(mib, key, 1, None, ce_mib[1][1])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--preset", default="nano", choices=list(MODEL_PRESETS))
    parser.add_argument("--vocab", type=int, nargs="+", default=[2048, 32768])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=32, help="top-k ids per position for the top-k losses")
    parser.add_argument("--samples", type=int, default=50, help="rs-kd draws per position")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--chunk-rows", type=int, help="fused rows per chunk (default: fused_loss's)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (steadier on a shared machine)"
    )
    parser.add_argument("--interleave", action="store_true", help="time the fused cases (and plain CE) in one "
                        "process, one step of each in turn, instead of a process per case; no memory column")
    parser.add_argument("--measure", nargs="+", default=["time", "memory"], choices=["time", "memory"],
                        help="what the per-process table measures (default both)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        result = run_case(json.loads(args.case))
        print(*(result if isinstance(result, tuple) else [result]))
        return
    if "ce" not in args.losses:
        args.losses = ["ce", *args.losses]
    if args.interleave:
        for vocab in args.vocab:
            cases = [c for c in cases_for(args, vocab) if c["path"] == "fused" or c["loss"] == "ce"]
            ms = run_interleaved(cases)
            ce_fused = ms[[(c["loss"], c["path"]) for c in cases].index(("ce", "fused"))]
            print(f"\n{args.preset}, vocab {vocab}, batch {args.batch}x{args.seq_len}, {args.device}: one step of each case "
                  f"in turn, {args.steps} rounds, median\n\n| loss | path | step ms | x CE fused |\n|---|---|---:|---:|")
            for case, t in zip(cases, ms):
                print(f"| {case['loss']} | {case['path']} | {t:.1f} | {t / ce_fused:.2f} |", flush=True)
        return
    for vocab in args.vocab:
        cases = cases_for(args, vocab)
        ms: dict[tuple[str, str], float] = {}
        mib: dict[tuple[str, str], list[float]] = {}
        if "time" in args.measure:
            spawn(cases[0], "time")  # a throwaway run: the first timed case must not pay for a cold device
        for _ in range(args.rounds if "time" in args.measure else 0):
            for case in cases:
                key = (case["loss"], case["path"])
                ms[key] = min(ms.get(key, math.inf), spawn(case, "time")[0])
                print(f"  vocab {vocab} {key[0]} {key[1]}: {ms[key]:.1f} ms", file=sys.stderr, flush=True)
        for case in cases if "memory" in args.measure else []:  # the median of --rounds fresh processes
            runs = [spawn(case, "memory") for _ in range(args.rounds)]
            mib[(case["loss"], case["path"])] = [statistics.median(values) for values in zip(*runs)]
        print(table(vocab, args, ms, mib) + "\n", flush=True)


if __name__ == "__main__":
    main()
