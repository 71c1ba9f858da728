"""The demo world: a corpus, a tokenizer and a small teacher made here, from text every machine has.

This module is the one recipe for that teacher; ``examples/demo.py``, ``examples/reproduce_rskd.py``,
the benchmarks and the tests' fixtures all make theirs with it, differing only in sizes.

1. text: the documentation strings of the Python standard library, read from its source files with
   ``ast`` (nothing is imported or run, nothing is downloaded);
2. tokenizer: a byte-level BPE trained on the documents with ``tokenizers``;
3. model: a randomly initialised Llama-style causal LM sized by a preset of
   :data:`logitcache.train.student.MODEL_PRESETS`;
4. pretraining (optional): cross-entropy on the corpus with ``logitcache train --corpus
   --init-from``, as a command (the demo, the benchmarks) or through
   :func:`logitcache.train.loop.run_train` with the same settings (the tests, the reproduction).

Everything is saved in Hugging Face format (``AutoModelForCausalLM``/``AutoTokenizer`` and vLLM load
it), in one folder::

    corpus.jsonl           the documents, one {"text": ...} per line (written by the caller)
    tokenizer/             the BPE tokenizer
    teacher-init/          the initial model, with the tokenizer
    teacher-run/student/   the pretrained teacher (``logitcache train``'s run folder around it)
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from logitcache.train.settings import TrainSettings
from logitcache.train.student import llama_config

EOS = "<|endoftext|>"
PAD = "<|pad|>"
BOS = "<|begin|>"  # only in a tokenizer trained with bos=True, which puts it in front of every text (as Llama's does)


def stdlib_docstrings(max_bytes: int | None = None) -> Iterator[str]:
    """Docstrings of the standard library's modules, classes and functions, in sorted file order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        if any(part in {"test", "tests", "idlelib", "site-packages", "lib2to3"} for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    yield doc
                    total += len(doc.encode())
                    if max_bytes is not None and total >= max_bytes:
                        return


def write_corpus(path: Path, documents: Iterator[str]) -> int:
    """Write documents as JSON Lines with a ``text`` field; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")
            count += 1
    return count


def train_tokenizer(texts: list[str], vocab_size: int, out: Path, bos: bool = False) -> None:
    """Train a byte-level BPE tokenizer on ``texts`` and save it in Hugging Face format under ``out``.

    ``bos``: a BOS token of its own that the tokenizer puts in front of every text (a BOS-sensitive
    tokenizer, as Llama's, Gemma's and Mistral's are); otherwise EOS doubles as BOS and nothing is
    added (as GPT-2's).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, *([BOS] if bos else [])],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=BOS if bos else EOS)
    fast.save_pretrained(str(out))


def make_model(
    tokenizer_dir: Path, out: Path, preset: str = "tiny", max_positions: int = 1024, seed: int = 0, vocab_size: int | None = None
) -> None:
    """Create a randomly initialised Llama-style model for the tokenizer in ``tokenizer_dir``; save both under ``out``.

    ``vocab_size`` may exceed the tokenizer's (padded output head, as many real checkpoints have).
    """
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(max(vocab_size or 0, len(tokenizer)), preset, max_positions, tokenizer))
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


# ---- the recipe ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSizes:
    """The sizes of a teacher: tokenizer ids, model preset and context, initial weights' seed.

    The defaults are ``make demo``'s teacher. ``head_rows``: output rows when more than the
    tokenizer's ids (a padded head, as many real checkpoints have); None: one per id. ``bos``: a
    tokenizer that puts a BOS of its own in front of every text, so that the teacher is pretrained
    with a BOS at every window and document start (:func:`train_tokenizer`).
    """

    vocab: int = 2048
    preset: str = "micro"
    max_positions: int = 128
    head_rows: int | None = None
    seed: int = 0
    bos: bool = False


PRETRAIN_STEPS = 1000  # make demo's teacher


def make_teacher(folder: Path, documents: list[str], sizes: TeacherSizes = TeacherSizes()) -> Path:
    """A tokenizer trained on ``documents`` and a randomly initialised model for it; returns ``folder/teacher-init``."""
    train_tokenizer(documents, sizes.vocab, folder / "tokenizer", bos=sizes.bos)
    make_model(folder / "tokenizer", folder / "teacher-init", preset=sizes.preset, max_positions=sizes.max_positions,
               seed=sizes.seed, vocab_size=sizes.head_rows)
    return folder / "teacher-init"


def pretraining(folder: Path, steps: int = PRETRAIN_STEPS, seq_len: int = 128, **options) -> TrainSettings:
    """The teacher's pretraining: CE on ``folder/corpus.jsonl`` from ``folder/teacher-init`` into ``folder/teacher-run``.

    The demo's hyper-parameters (16 windows a step, learning rate 3e-3, 50 warmup steps at most,
    one evaluation and one checkpoint at the end) unless ``options`` (``TrainSettings`` fields) say otherwise.
    """
    demo = dict(batch_size=16, lr=3e-3, warmup_steps=min(50, steps - 1), eval_every=steps, save_every=steps)
    return TrainSettings(out=folder / "teacher-run", corpus=folder / "corpus.jsonl", tokenizer=folder / "tokenizer",
                         init_from=folder / "teacher-init", seq_len=seq_len, steps=steps, **{**demo, **options})


# The options a pretraining command spells out, in the order the demo prints them.
_COMMAND_OPTIONS = ("corpus", "tokenizer", "init_from", "out", "seq_len", "steps", "batch_size", "lr", "warmup_steps",
                    "eval_every", "save_every")


def train_command(settings: TrainSettings) -> list[str]:
    """``settings`` as the ``logitcache train`` arguments a user types (only :data:`_COMMAND_OPTIONS` may differ
    from the defaults: others would be lost on the way)."""
    given = {name: getattr(settings, name) for name in _COMMAND_OPTIONS}
    spelled = TrainSettings(**given)
    lost = [field.name for field in fields(settings) if getattr(settings, field.name) != getattr(spelled, field.name)]
    if lost:
        raise ValueError(f"train_command spells {', '.join(_COMMAND_OPTIONS)}, not {', '.join(lost)}: run those with run_train")
    return ["train", *(word for name, value in given.items() for word in (f"--{name.replace('_', '-')}", str(value)))]


def run_quietly(*args: str | Path) -> None:
    """Run ``logitcache ARGS`` in a subprocess, its output (progress and log lines) discarded."""
    subprocess.run([sys.executable, "-m", "logitcache", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


def make_trained_teacher(
    folder: Path, documents: list[str], sizes: TeacherSizes = TeacherSizes(), steps: int = PRETRAIN_STEPS,
    seq_len: int = 128, run: Callable[..., None] = run_quietly,
) -> Path:
    """:func:`make_teacher`, then its :func:`pretraining` run by ``run(*train_command(...))``; returns the teacher.

    ``folder/corpus.jsonl`` must hold the corpus already (:func:`write_corpus`). The defaults give
    ``make demo``'s teacher, bit for bit on the same machine.
    """
    make_teacher(folder, documents, sizes)
    settings = pretraining(folder, steps, seq_len)
    run(*train_command(settings))
    return settings.out / "student"
