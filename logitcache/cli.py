"""The ``logitcache`` command line. Commands are thin: they map options to a settings dataclass,
call the library, and turn a :class:`LogitcacheError` into one red line and exit code 1
(set ``LOGITCACHE_DEBUG=1`` for the traceback)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from logitcache import __version__
from logitcache.build.settings import BuildSettings
from logitcache.cache.layout import MANIFEST_NAME
from logitcache.errors import LogitcacheError
from logitcache.generate.settings import EvaluateSettings, GenerateSettings
from logitcache.rounds.settings import RoundsSettings
from logitcache.teacher.options import CPU_CHUNK_MIB, CPU_MIN_CHUNK_ROWS, CUDA_CHUNK_MIB
from logitcache.train.settings import LOSS_OPTIONS, TrainSettings

app = typer.Typer(
    help="Run a teacher LLM once, cache sparse targets in Parquet, distil students from the cache.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)


def _defaults(settings: type) -> dict[str, object]:
    """The field defaults of a settings dataclass: the one place each option's default is written."""
    return {field.name: field.default for field in fields(settings) if field.default is not MISSING}


BUILD = _defaults(BuildSettings)
TRAIN = _defaults(TrainSettings)
GENERATE = _defaults(GenerateSettings)
EVALUATE = _defaults(EvaluateSettings)
ROUNDS = _defaults(RoundsSettings)

# Options and arguments that mean the same in several commands, declared once.
CacheDir = Annotated[Path, typer.Argument(help="A cache folder written by `logitcache build`.")]
SeqLen = Annotated[int, typer.Option(
    "--seq-len", "--max-len",
    help="Most tokens per row (--packing documents; chat and prompt-response examples: longer ones per --too-long) "
         "or tokens per window (stream).")]
Bos = Annotated[str, typer.Option(
    help="BOS in front of every document and row: auto (where the tokenizer adds one itself), always, never.")]
Packing = Annotated[str, typer.Option(
    help="documents: one document per row, seen alone (pretrained LLMs); stream: fixed windows cut "
         "across documents, attention crossing them (teachers trained that way, like the demo's).")]
TextField = Annotated[str, typer.Option(help="Field holding the text in JSON Lines, Parquet and datasets corpora.")]
ModelDir = Annotated[Path, typer.Option(help="Model folder in Hugging Face format (config, weights, tokenizer).")]
RecordFormat = Annotated[str, typer.Option(
    "--format", help="chat: a list of {role, content} messages per record; prompt-response: plain-text prompt and response fields.")]
CorpusFormat = Annotated[str, typer.Option(
    "--format", help="text: documents in --text-field; chat: {role, content} messages per record (targets only "
                     "at assistant tokens); prompt-response: prompt and response fields (targets only at the response).")]
TooLong = Annotated[str, typer.Option(
    help="chat/prompt-response: an example beyond --seq-len is cut to it (truncate) or left out (skip); counted in the manifest.")]
MessagesField = Annotated[str, typer.Option(help="Field holding the messages of chat records.")]
PromptField = Annotated[str, typer.Option(help="Field holding the prompt of prompt-response records.")]
ResponseField = Annotated[str, typer.Option(help="Field holding the response of prompt-response records.")]
ChatTemplate = Annotated[Optional[Path], typer.Option(
    help="Jinja chat template file, for a model whose tokenizer has none (default: the tokenizer's own).")]
MaxNewTokens = Annotated[int, typer.Option(help="Most tokens generated per response.")]
PromptsPerBatch = Annotated[int, typer.Option("--batch-size", help="Prompts generated for at once (left-padded).")]
ModelDevice = Annotated[Optional[str], typer.Option(help="Torch device (default: cuda if present, else cpu).")]
ModelDtype = Annotated[Optional[str], typer.Option(help="Model dtype (default: bfloat16 on CUDA, float32 on CPU).")]


@contextmanager
def user_errors():
    """Known errors → one red line and exit 1; the traceback only with LOGITCACHE_DEBUG=1."""
    try:
        yield
    except LogitcacheError as exc:
        if os.environ.get("LOGITCACHE_DEBUG"):
            raise
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:  # a full disk, a file size limit, a folder that cannot be made: the system's own words
        if os.environ.get("LOGITCACHE_DEBUG"):
            raise
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@contextmanager
def progress_bar(description: str, total: int | None = None):
    """A rich progress bar on stderr, shown from the first ``advance(n)`` on (so early errors stay one line)."""
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn()]
    progress = Progress(*columns, console=console, transient=False)
    task = progress.add_task(description, total=total)

    def advance(n: int = 0, **fields: object) -> None:
        """Advance by ``n`` (or set ``completed=``, ``description=``), drawing the bar the first time."""
        if not progress.live.is_started:
            progress.start()
        progress.update(task, advance=n, **fields)

    try:
        yield advance
    finally:
        progress.stop()


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


class _Notes(logging.Handler):
    """The package's log records (``logging.getLogger("logitcache...")``, INFO and up) as ``note:`` lines."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]note:[/yellow] {escape(record.getMessage())}", highlight=False, soft_wrap=True)


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
) -> None:
    """logitcache: offline knowledge distillation for language models."""
    package_log = logging.getLogger("logitcache")
    if not any(isinstance(handler, _Notes) for handler in package_log.handlers):
        package_log.addHandler(_Notes())
    package_log.setLevel(logging.INFO)
    package_log.propagate = False  # shown once, also after a library (rouge-score's absl) configures the root logger


@app.command()
def build(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Option(help="Teacher model folder in Hugging Face format (config, weights, tokenizer).")],
    corpus: Annotated[Path, typer.Option(
        help="Text corpus: .txt/.md, .jsonl, .jsonl.zst, .parquet, a folder of these, or a saved `datasets` dataset.")],
    out: Annotated[Path, typer.Option(help="Output folder for the shards and manifest.json.")],
    method: Annotated[str, typer.Option(
        help="topk: top-k log-probs + tail mass; sample: RS-KD importance sampling (unbiased).")] = BUILD["method"],
    k: Annotated[int, typer.Option(help="Ids kept per position with --method topk.")] = BUILD["k"],
    samples: Annotated[int, typer.Option(
        help="Draws N per position with --method sample (the paper uses 50).")] = BUILD["samples"],
    seed: Annotated[int, typer.Option(help="Sampling seed; draws depend only on (seed, sequence_id, position).")] = BUILD["seed"],
    proposal_temperature: Annotated[float, typer.Option(
        help="Sample from softmax(logits / T) instead of the teacher; losses reweight by t/q.")] = BUILD["proposal_temperature"],
    logprob_bits: Annotated[int, typer.Option(
        min=0, max=10, help="sample: mantissa bits kept in stored log-probabilities (10 = float16's, as "
                            "top-k and gold keep; 7 keeps relative error below 2^-8 and saves ~0.4 B per entry). "
                            "0: none stored, ids and counts only (the RS-KD paper's cache, ~30 % smaller at 32k-262k "
                            "ids; only --loss rs-kd and ce read it; proposal temperature 1).")] = BUILD["logprob_bits"],
    seq_len: SeqLen = BUILD["seq_len"],
    bos: Bos = BUILD["bos"],
    packing: Packing = BUILD["packing"],
    batch_size: Annotated[int, typer.Option(help="Windows per teacher forward pass.")] = BUILD["batch_size"],
    shard_size: Annotated[int, typer.Option(help="Windows per Parquet shard.")] = BUILD["shard_size"],
    text_field: TextField = BUILD["text_field"],
    format: CorpusFormat = BUILD["format"],
    messages_field: MessagesField = BUILD["messages_field"],
    prompt_field: PromptField = BUILD["prompt_field"],
    response_field: ResponseField = BUILD["response_field"],
    chat_template: ChatTemplate = BUILD["chat_template"],
    too_long: TooLong = BUILD["too_long"],
    overwrite: Annotated[bool, typer.Option(help="Replace a different build found in --out.")] = BUILD["overwrite"],
    backend: Annotated[str, typer.Option(help="Teacher engine: hf (transformers; CPU or GPU) or vllm (GPU).")] = BUILD["backend"],
    device: Annotated[Optional[str], typer.Option(
        help="Torch device for the hf backend (default: cuda if present, else "
             "cpu); vllm: device of the sample path's output head (default cuda).")] = BUILD["device"],
    dtype: Annotated[Optional[str], typer.Option(
        help="Teacher dtype (default: bfloat16 on CUDA, float32 on CPU; vllm: bfloat16).")] = BUILD["dtype"],
    chunk_mib: Annotated[Optional[int], typer.Option(
        help=f"Memory bound for one chunk of output-head rows, MiB (default: {CPU_CHUNK_MIB} on CPU but at least "
             f"{CPU_MIN_CHUNK_ROWS} rows, {CUDA_CHUNK_MIB} on CUDA; vllm: also caps prompt-logprob logits per engine step, "
             "default 2048).")] = BUILD["chunk_mib"],
    cpu_streams: Annotated[Optional[int], typer.Option(
        help="hf on CPU: teacher batches computed at once, each on an equal share of "
             "torch's threads (default 2; 1 = one batch at a time on all threads).")] = BUILD["cpu_streams"],
    num_workers: Annotated[int, typer.Option(
        help="Workers sharing this build (one process per GPU or node).")] = BUILD["num_workers"],
    worker_index: Annotated[int, typer.Option(help="This worker's index in [0, --num-workers).")] = BUILD["worker_index"],
    tensor_parallel_size: Annotated[int, typer.Option(
        help="vllm: GPUs per teacher replica (tensor parallelism).")] = BUILD["tensor_parallel_size"],
    gpu_memory_utilization: Annotated[float, typer.Option(
        help="vllm: fraction of GPU memory the engine may take.")] = BUILD["gpu_memory_utilization"],
    max_num_seqs: Annotated[Optional[int], typer.Option(
        help="vllm: most windows scheduled at once (default: vLLM's).")] = BUILD["max_num_seqs"],
    ray: Annotated[bool, typer.Option(
        help="Run the --num-workers workers as Ray tasks on the current Ray cluster.")] = BUILD["ray"],
) -> None:
    """Run the teacher over a corpus and write sparse targets as zstd Parquet shards (resumable)."""
    from logitcache.build.run import run_build
    from logitcache.cache.summary import summarize

    settings = BuildSettings(**ctx.params)  # the options, by name: one field per option
    with user_errors(), progress_bar(f"build {method}") as advance:
        if settings.ray:
            from logitcache.executors.ray import run_ray_build

            manifest = run_ray_build(settings)
        else:
            manifest = run_build(settings, on_windows=advance)
    if (out / MANIFEST_NAME).is_file():
        with user_errors():
            _print_summary(summarize(out))
    else:
        console.print(f"worker {worker_index} done: {len(manifest['shards'])} shards; waiting for the other workers' parts")


def _print_summary(summary: dict) -> None:
    table = Table(show_header=False, box=None)
    def shown(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, dict):
            return ", ".join(f"{key}: {shown(item)}" for key, item in value.items())
        return str(value)

    for key, value in summary.items():
        table.add_row(key, shown(value))
    Console().print(table)


@app.command()
def validate(
    cache: CacheDir,
    quick: Annotated[bool, typer.Option(help="Check files, sizes, checksums and schemas only, not every row.")] = False,
) -> None:
    """Check the manifest against the files: checksums, schema, row and token counts."""
    from logitcache.cache.validate import validate_cache

    with user_errors():
        problems = validate_cache(cache, deep=not quick)
    for problem in problems:
        console.print(f"[red]✗[/red] {escape(problem)}", highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    Console().print(f"[green]✓[/green] {escape(str(cache))}: cache is sound", soft_wrap=True)


@app.command()
def inspect(
    cache: CacheDir,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statistics as JSON (stable keys).")] = False,
) -> None:
    """Sequences, tokens, bytes per token, ids per position, covered mass and teacher perplexity."""
    from logitcache.cache.summary import summarize

    with user_errors():
        summary = summarize(cache)
    if as_json:
        # Strict JSON: an infinite perplexity (a broken teacher) is null, as non-Python parsers reject Infinity.
        def finite(value):
            if isinstance(value, dict):
                return {key: finite(item) for key, item in value.items()}
            return None if isinstance(value, float) and not math.isfinite(value) else value

        typer.echo(json.dumps(finite(summary), indent=2, allow_nan=False))
    else:
        _print_summary(summary)


@app.command()
def merge(cache: CacheDir) -> None:
    """Assemble manifest.json from the partial manifests of a multi-worker build."""
    from logitcache.cache.merge import merge_parts

    with user_errors():
        manifest = merge_parts(cache)
    merged = f"merged {len(manifest['shards'])} shards into {escape(str(cache / 'manifest.json'))}"
    Console().print(f"[green]✓[/green] {merged}", soft_wrap=True)


@app.command()
def export(
    cache: CacheDir,
    to: Annotated[str, typer.Option(
        help="axolotl: the rows axolotl's KD trainer reads (top-k renormalised over its ids, sample counts as RS-KD "
             "weights; tail mass and counts dropped); hf: every stored value, one list per position, for TRL or "
             "your own loop.")],
    out: Annotated[Path, typer.Option(help="Folder to write the dataset to (open it with datasets.load_from_disk).")],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
) -> None:
    """Write a cache as a Hugging Face dataset: for axolotl's KD trainer, or for TRL and custom loops (README: Export)."""
    import datasets

    from logitcache.cache.export import export_cache
    from logitcache.cache.manifest import read_manifest

    datasets.disable_progress_bars()  # the command draws its own
    with user_errors():
        total = read_manifest(cache)["totals"]["sequences"]
    with user_errors(), progress_bar(f"export {to}", total=total) as advance:
        about = export_cache(cache, out, to, overwrite=overwrite, progress=advance)
    done = f"exported {about['sequences']} windows ({about['method']}) to {escape(str(out))} for {to}"
    Console().print(f"[green]✓[/green] {done}", soft_wrap=True)


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="A cache in an older shard format (v1, v2 or v3) than this logitcache writes.")],
    dst: Annotated[Path, typer.Argument(help="A new or empty folder for the converted cache; the folder of an "
                                             "interrupted conversion of SRC continues.")],
) -> None:
    """Rewrite an older cache in the current shard format (v4; the same targets), shard by shard, resumable."""
    from logitcache.cache.convert import convert_cache
    from logitcache.cache.manifest import read_manifest

    with user_errors():
        shards = len(read_manifest(src)["shards"])
        with progress_bar("convert", total=shards) as advance:
            manifest = convert_cache(src, dst, on_shard=lambda _: advance(1))
    done = f"{escape(str(dst))}: {len(manifest['shards'])} shards in format v{manifest['format_version']}"
    Console().print(f"[green]✓[/green] {done}", soft_wrap=True)


@app.command()
def train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Output folder: metrics.jsonl, checkpoint/, student/, loss.png.")],
    cache: Annotated[Optional[Path], typer.Option(
        help="Distil from this cache folder (written by `logitcache build`).")] = TRAIN["cache"],
    loss: Annotated[Optional[str], typer.Option(
        help="Loss with --cache: ce, rs-kd, topk-renorm, topk-ghost, kl, "
             "reverse-kl, skew-kl, skew-reverse-kl, gkd-jsd, minillm (a cache of generated responses), bild, rlkd "
             "(--corpus: ce).")] = TRAIN["loss"],
    corpus: Annotated[Optional[Path], typer.Option(
        help="Instead of --cache: train with cross-entropy on this "
             "text corpus (held in memory; for small corpora).")] = TRAIN["corpus"],
    tokenizer: Annotated[Optional[Path], typer.Option(
        help="Tokenizer folder: required with --corpus; with --cache "
             "it must be the cache's and is saved beside the student.")] = TRAIN["tokenizer"],
    seq_len: Annotated[int, typer.Option(
        "--seq-len", "--max-len",
        help="With --corpus: tokens per window, or most tokens per row and example (a cache has its own).")] = TRAIN["seq_len"],
    bos: Bos = TRAIN["bos"],
    packing: Annotated[str, typer.Option(
        help="With --corpus: documents (one per row, padded) or stream (fixed windows across documents).")] = TRAIN["packing"],
    format: CorpusFormat = TRAIN["format"],
    messages_field: MessagesField = TRAIN["messages_field"],
    prompt_field: PromptField = TRAIN["prompt_field"],
    response_field: ResponseField = TRAIN["response_field"],
    chat_template: ChatTemplate = TRAIN["chat_template"],
    too_long: TooLong = TRAIN["too_long"],
    text_field: TextField = TRAIN["text_field"],
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = TRAIN["steps"],
    batch_size: Annotated[int, typer.Option(
        help="Windows per micro-batch of each process (one forward pass).")] = TRAIN["batch_size"],
    grad_accum: Annotated[int, typer.Option(
        help="Micro-batches per optimizer step; a step takes batch-size "
             "x grad-accum x processes windows (the global batch).")] = TRAIN["grad_accum"],
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = TRAIN["lr"],
    min_lr_ratio: Annotated[float, typer.Option(help="The cosine decay ends at lr x this ratio.")] = TRAIN["min_lr_ratio"],
    warmup_steps: Annotated[int | None, typer.Option(
        help="Steps of linear warmup to --lr; below --steps. "
             "Default: 100, or a tenth of --steps if that is less.")] = TRAIN["warmup_steps"],
    weight_decay: Annotated[float, typer.Option(
        help="AdamW weight decay on weight matrices (not norms or biases).")] = TRAIN["weight_decay"],
    clip: Annotated[float, typer.Option(help="Clip the gradient norm to this value (0: no clipping).")] = TRAIN["clip"],
    alpha: Annotated[float, typer.Option(
        help="Weight of CE on gold tokens: loss = (1 - alpha) x kd + alpha x ce.")] = TRAIN["alpha"],
    temperature: Annotated[Optional[float], typer.Option(
        help="Distillation temperature (kl, topk-renorm, bild, rlkd; the "
             "others need 1). Default: the loss's own (bild 3, others 1).")] = TRAIN["temperature"],
    skew: Annotated[Optional[float], typer.Option(
        help="Mixing weight of skew-kl and skew-reverse-kl, in (0, 1) (default 0.1, as DistiLLM).")] = TRAIN["skew"],
    jsd_beta: Annotated[Optional[float], typer.Option(
        help="gkd-jsd: beta of GKD's generalised JSD, in (0, 1) (default 0.5; toward 0 forward KL, toward 1 "
             "reverse KL).")] = TRAIN["jsd_beta"],
    pg_clip: Annotated[Optional[float], typer.Option(
        help="minillm: importance ratios of stale samples are clipped to 1 +- this, as PPO does, in (0, 1) "
             "(default 0.2).")] = TRAIN["pg_clip"],
    pg_baseline: Annotated[Optional[str], typer.Option(
        help="minillm: whiten (default; the long-term rewards standardised over the micro-batch, as MiniLLM's "
             "implementation does) or none.")] = TRAIN["pg_baseline"],
    loss_k: Annotated[Optional[int], typer.Option(
        help="Top-k of bild (logit differences among the top k; default 8) "
             "and rlkd (rank term over the union of both top k; default 15).")] = TRAIN["loss_k"],
    rank_temperature: Annotated[Optional[float], typer.Option(
        help="rlkd: temperature of the sigmoid soft ranks (default 0.1).")] = TRAIN["rank_temperature"],
    rlkd_base: Annotated[Optional[str], typer.Option(
        help="rlkd: the loss its rank term is added to: kl (default), "
             "topk-renorm, topk-ghost, reverse-kl, skew-kl, skew-reverse-kl.")] = TRAIN["rlkd_base"],
    eval_every: Annotated[int, typer.Option(help="Evaluate every N steps and at the end (0: never).")] = TRAIN["eval_every"],
    eval_windows: Annotated[int, typer.Option(
        help="Windows to evaluate on; without --eval-cache "
             "they are held out of training (the last ones).")] = TRAIN["eval_windows"],
    pack: Annotated[bool, typer.Option(
        help="A cache whose rows differ in length (--packing documents, chat): several rows per student row, each "
             "seen alone (position ids restart; transformers masks across rows), instead of padding each.")] = TRAIN["pack"],
    eval_prompts: Annotated[Optional[Path], typer.Option(
        help="Chat or prompt-response records ending in a reference answer: at each evaluation the student answers "
             "greedily and is scored (task_exact_match, task_rouge_l); one process only.")] = TRAIN["eval_prompts"],
    eval_max_new_tokens: Annotated[int, typer.Option(
        help="Most tokens of each answer to --eval-prompts.")] = TRAIN["eval_max_new_tokens"],
    eval_cache: Annotated[Optional[Path], typer.Option(
        help="Evaluate on the first --eval-windows windows of this cache instead of a held-out split.")] = TRAIN["eval_cache"],
    save_every: Annotated[int, typer.Option(
        help="Write OUT/checkpoint every N steps (0: only at the end).")] = TRAIN["save_every"],
    resume: Annotated[bool, typer.Option(
        help="Continue from OUT/checkpoint with the same options (start fresh if there is none).")] = TRAIN["resume"],
    seed: Annotated[int, typer.Option(help="Seed of the student's initialisation and of the data order.")] = TRAIN["seed"],
    student: Annotated[Optional[str], typer.Option(
        help="Student preset: nano, micro, tiny, small, base or "
             "large (Llama-style configs; see logitcache/train/student.py).")] = TRAIN["student"],
    student_config: Annotated[Optional[Path], typer.Option(
        help="Student from a Hugging Face config.json (random init) instead of a preset.")] = TRAIN["student_config"],
    init_from: Annotated[Optional[Path], typer.Option(
        help="Student from the weights of a Hugging Face model folder instead of a preset.")] = TRAIN["init_from"],
    compile: Annotated[bool, typer.Option(help="Compile the student's forward pass with torch.compile.")] = TRAIN["compile"],
    fused_loss: Annotated[bool, typer.Option(
        help="Fuse the output head with the loss in chunks of rows: no [B, T, vocab] logits in memory (falls back to the plain "
             "loss when the student's logits are not its head of its hidden states; off under --fsdp).")] = TRAIN["fused_loss"],
    device: Annotated[Optional[str], typer.Option(
        help="Torch device (default: cuda if present, else cpu); bf16 autocast on "
             "CUDA. Under torchrun: cuda or cpu, each process takes cuda:LOCAL_RANK.")] = TRAIN["device"],
    fsdp: Annotated[bool, typer.Option(
        help="Under torchrun: shard the student's weights, gradients and optimizer "
             "state over the processes (FSDP2) instead of copying it to each (DDP).")] = TRAIN["fsdp"],
    lanes: Annotated[Optional[int], typer.Option(
        help="Contiguous runs of the data order per global batch (default: the number of processes; a resume keeps "
             "the checkpoint's). Pass N to replay an N-process run's order on another number of processes.")] = TRAIN["lanes"],
) -> None:
    """Train a student: distil it from a cache (--cache, --loss) or pretrain it on text (--corpus, --tokenizer).

    Several processes: `torchrun --nproc-per-node N -m logitcache train ...` (DDP, or FSDP with --fsdp).
    """
    import transformers

    from logitcache.train.loop import run_train

    settings = TrainSettings(**ctx.params)  # the options, by name: one field per option
    transformers.logging.disable_progress_bar()
    with user_errors():
        settings.check()  # bad options fail before a progress bar is drawn
    if os.environ.get("RANK", "0") != "0":  # under torchrun, process 0 alone shows progress
        with user_errors():
            run_train(settings)
        return
    with user_errors(), progress_bar("train", total=steps) as advance:

        def on_step(record: dict) -> None:
            if record["kind"] == "train":
                advance(completed=record["step"], description=f"train loss {record['loss']:.4f}")
            else:
                shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float))
                console.print(f"eval @ {record['step']}: {shown}", highlight=False)

        final = run_train(settings, on_step=on_step)
    _print_summary(final)


@app.command()
def generate(
    ctx: typer.Context,
    model: ModelDir,
    prompts: Annotated[Path, typer.Option(
        help="Prompts: chat records ending with a user turn (or with a reference answer, which is left out), or "
             "prompt records; .jsonl, .jsonl.zst, .parquet, a folder of these or a saved `datasets` dataset.")],
    out: Annotated[Path, typer.Option(
        help="Output JSON Lines file: the prompts' records with the responses; rerun to continue an interrupted run.")],
    format: RecordFormat = GENERATE["format"],
    messages_field: MessagesField = GENERATE["messages_field"],
    prompt_field: PromptField = GENERATE["prompt_field"],
    response_field: ResponseField = GENERATE["response_field"],
    chat_template: ChatTemplate = GENERATE["chat_template"],
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0: greedy decoding.")] = GENERATE["temperature"],
    top_p: Annotated[float, typer.Option(
        help="Sample from the smallest set of likeliest tokens holding this much probability (1: all).")] = GENERATE["top_p"],
    max_new_tokens: MaxNewTokens = GENERATE["max_new_tokens"],
    seed: Annotated[int, typer.Option(
        help="Sampling seed; a response depends only on (seed, prompt index), not on the batch size.")] = GENERATE["seed"],
    batch_size: PromptsPerBatch = GENERATE["batch_size"],
    device: ModelDevice = GENERATE["device"],
    dtype: ModelDtype = GENERATE["dtype"],
) -> None:
    """Generate a model's responses to prompts, written as a corpus that `build --format chat` reads (resumable)."""
    import transformers

    from logitcache.generate.run import run_generate

    settings = GenerateSettings(**ctx.params)  # the options, by name: one field per option
    transformers.logging.disable_progress_bar()
    with user_errors(), progress_bar("generate") as advance:
        counts = run_generate(settings, on_progress=lambda done, total: advance(completed=done, total=total))
    _print_summary(counts)


@app.command()
def evaluate(
    ctx: typer.Context,
    model: ModelDir,
    prompts: Annotated[Path, typer.Option(
        help="Held-out prompts with reference answers: chat records ending with the assistant's answer, or "
             "prompt-response records.")],
    format: RecordFormat = EVALUATE["format"],
    messages_field: MessagesField = EVALUATE["messages_field"],
    prompt_field: PromptField = EVALUATE["prompt_field"],
    response_field: ResponseField = EVALUATE["response_field"],
    chat_template: ChatTemplate = EVALUATE["chat_template"],
    max_new_tokens: MaxNewTokens = EVALUATE["max_new_tokens"],
    batch_size: PromptsPerBatch = EVALUATE["batch_size"],
    device: ModelDevice = EVALUATE["device"],
    dtype: ModelDtype = EVALUATE["dtype"],
) -> None:
    """Score a model's greedy answers against reference answers: exact match and ROUGE-L."""
    import transformers

    from logitcache.generate.tasks import run_evaluate

    settings = EvaluateSettings(**ctx.params)  # the options, by name: one field per option
    transformers.logging.disable_progress_bar()
    with user_errors(), progress_bar("evaluate") as advance:
        scores = run_evaluate(settings, on_progress=lambda done, total: advance(completed=done, total=total))
    _print_summary(scores)


@app.command()
def rounds(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Option(help="Teacher model folder in Hugging Face format; scores each round's answers.")],
    student: Annotated[Path, typer.Option(
        help="The round-0 student: a model folder with its tokenizer (e.g. an SFT run's OUT/student).")],
    prompts: Annotated[Path, typer.Option(
        help="Prompts, as `generate` reads them (a record's reference answer is left out of the prompt).")],
    out: Annotated[Path, typer.Option(
        help="Output folder: rounds.json, rounds.jsonl and round-R/ per round; rerun to continue a stopped run.")],
    loss: Annotated[str, typer.Option(
        help="Training loss on each round's cache, as `train --loss` (e.g. reverse-kl, gkd-jsd; rs-kd with --method sample).")],
    rounds: Annotated[int, typer.Option(
        help="Rounds to run; a rerun with more continues after the last finished one.")] = ROUNDS["rounds"],
    steps: Annotated[int, typer.Option(help="Optimizer steps per round.")] = ROUNDS["steps"],
    prompts_per_round: Annotated[Optional[int], typer.Option(
        help="Prompts per round: round r takes the next N of a permutation seeded by --seed, wrapping (default: all).")
    ] = ROUNDS["prompts_per_round"],
    temperature: Annotated[float, typer.Option(
        help="The students' sampling temperature (0: greedy).")] = ROUNDS["temperature"],
    top_p: Annotated[float, typer.Option(
        help="Sample from the smallest set of likeliest tokens holding this much probability (1: all).")] = ROUNDS["top_p"],
    max_new_tokens: Annotated[int, typer.Option(
        help="Most tokens per generated response (and per answer to --eval-prompts).")] = ROUNDS["max_new_tokens"],
    generate_batch_size: Annotated[int, typer.Option(
        help="Prompts generated for at once (left-padded), also with --eval-prompts.")] = ROUNDS["generate_batch_size"],
    off_policy_fraction: Annotated[float, typer.Option(
        help="Fraction in [0, 1) of each round's examples taken from --off-policy-data (teacher-forced reference answers).")
    ] = ROUNDS["off_policy_fraction"],
    off_policy_data: Annotated[Optional[Path], typer.Option(
        help="Records with reference answers, in the prompts' --format, mixed in per --off-policy-fraction.")
    ] = ROUNDS["off_policy_data"],
    method: Annotated[str, typer.Option(
        help="The teacher's targets: sample (RS-KD, unbiased) or topk.")] = ROUNDS["method"],
    k: Annotated[int, typer.Option(help="Ids kept per position with --method topk.")] = ROUNDS["k"],
    samples: Annotated[int, typer.Option(help="Draws per position with --method sample.")] = ROUNDS["samples"],
    seq_len: Annotated[int, typer.Option(
        "--seq-len", "--max-len", help="Most tokens per example in the teacher's build (longer ones are truncated).")
    ] = ROUNDS["seq_len"],
    build_batch_size: Annotated[int, typer.Option(help="Examples per teacher forward pass.")] = ROUNDS["build_batch_size"],
    batch_size: Annotated[int, typer.Option(help="Training examples per micro-batch.")] = ROUNDS["batch_size"],
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = ROUNDS["grad_accum"],
    lr: Annotated[float, typer.Option(help="Peak learning rate of each round (AdamW, warmup then cosine).")] = ROUNDS["lr"],
    warmup_steps: Annotated[Optional[int], typer.Option(
        help="Warmup steps of each round (default: as `train`'s).")] = ROUNDS["warmup_steps"],
    alpha: Annotated[float, typer.Option(
        help="Weight of CE on the sampled tokens: loss = (1 - alpha) x kd + alpha x ce.")] = ROUNDS["alpha"],
    loss_option: Annotated[Optional[list[str]], typer.Option(
        help="A loss-specific option of `train`, as NAME=VALUE with NAME its option there (e.g. jsd-beta=0.5, "
             f"skew=0.1); repeat for several. Names: {', '.join(option for option, _, _ in LOSS_OPTIONS.values())}.")
    ] = None,
    save_every: Annotated[int, typer.Option(
        help="Checkpoint every N steps of a round's training (0: only at its end).")] = ROUNDS["save_every"],
    format: RecordFormat = ROUNDS["format"],
    messages_field: MessagesField = ROUNDS["messages_field"],
    prompt_field: PromptField = ROUNDS["prompt_field"],
    response_field: ResponseField = ROUNDS["response_field"],
    chat_template: ChatTemplate = ROUNDS["chat_template"],
    eval_prompts: Annotated[Optional[Path], typer.Option(
        help="Held-out records with reference answers: each round's student is scored on them (exact match, ROUGE-L).")
    ] = ROUNDS["eval_prompts"],
    device: ModelDevice = ROUNDS["device"],
    seed: Annotated[int, typer.Option(
        help="Seed of the prompts' permutation; round r generates, builds and trains with seed + r.")] = ROUNDS["seed"],
) -> None:
    """On-policy distillation in rounds: the student answers, the teacher scores the answers once, the student
    trains on them from its own weights; repeat (resumable)."""
    import transformers

    from logitcache.rounds.run import run_rounds

    settings = RoundsSettings(**{**ctx.params, "loss_option": tuple(loss_option or ())})
    transformers.logging.disable_progress_bar()

    with user_errors():
        records = run_rounds(settings, stage_progress=progress_bar)  # a bar per stage, its line kept
    _print_summary(records[-1])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
