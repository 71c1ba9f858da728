"""A small teacher made here, from text every machine has: no download.

The text is the documentation strings of the Python standard library, read from its source
files with ``ast`` (nothing is imported or run). A byte-level BPE tokenizer is trained on it with
``tokenizers``, and a Llama-style causal LM is created from a transformers config; both are saved
in Hugging Face format, so ``AutoModelForCausalLM``/``AutoTokenizer`` (and vLLM) load them.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"

MODEL_PRESETS = {
    # name: (hidden, layers, heads, intermediate)
    "nano": (64, 2, 2, 128),
    "micro": (128, 2, 4, 256),
    "tiny": (192, 4, 4, 512),
    "small": (384, 6, 6, 1024),
    "base": (768, 12, 12, 3072),
    "large": (2048, 16, 16, 5504),
}


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


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> None:
    """Train a byte-level BPE tokenizer on ``texts`` and save it in Hugging Face format under ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=EOS)
    fast.save_pretrained(str(out))


def llama_config(vocab_size: int, preset: str = "tiny", max_positions: int = 1024, tokenizer=None):
    """A Llama-style config of one of :data:`MODEL_PRESETS`."""
    from transformers import LlamaConfig

    hidden, layers, heads, inner = MODEL_PRESETS[preset]
    eos = tokenizer.eos_token_id if tokenizer is not None else 0
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inner,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
    )


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
