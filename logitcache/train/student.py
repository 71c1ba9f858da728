"""The student: a causal LM in Hugging Face format, made from a preset, a config file or a model folder.

Exactly one source names the student:

- a preset of :data:`MODEL_PRESETS` (a Llama-style config sized by name, :func:`llama_config`);
- a config file (an HF ``config.json``, or a folder holding one), randomly initialised;
- an HF model folder (``--init-from``), whose weights are the starting point.

Target ids index the teacher's logits, so a student distilled from a cache must have the cache's
logits dimension (:func:`logitcache.loader.dataset.check_student_vocab`); a student trained on raw
text needs at least one logit per token of the tokenizer. The model is kept in float32; mixed
precision is the trainer's business (autocast).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from logitcache.errors import LogitcacheError
from logitcache.loader.dataset import check_student_vocab
from logitcache.teacher.folder import context_length, tokenizer_fingerprint

log = logging.getLogger(__name__)


def check_source(preset: str | None, config_file: Path | None, init_from: Path | None) -> None:
    """Refuse anything but exactly one student source, or an unknown preset."""
    options = (("--student", preset), ("--student-config", config_file), ("--init-from", init_from))
    given = [name for name, value in options if value is not None]
    if len(given) != 1:
        what = "none" if not given else " and ".join(given)
        raise LogitcacheError(
            f"name the student with exactly one of --student PRESET, --student-config FILE or --init-from DIR (got {what})"
        )
    if preset is not None and preset not in MODEL_PRESETS:
        raise LogitcacheError(f"--student {preset!r}: choose one of {', '.join(MODEL_PRESETS)}")


def _config_from_file(path: Path, vocab_size: int):
    """An HF config from ``config.json`` (or a folder holding one); ``vocab_size`` fills a missing one."""
    from transformers import AutoConfig

    file = path / "config.json" if path.is_dir() else path
    try:
        fields = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LogitcacheError(f"--student-config {path}: cannot read a JSON config ({exc})") from exc
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise LogitcacheError(f"--student-config {path}: expected an HF config.json with a 'model_type' field")
    fields.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except (ValueError, KeyError) as exc:
        raise LogitcacheError(f"--student-config {path}: {exc}") from exc


def build_student(
    *,
    preset: str | None,
    config_file: Path | None,
    init_from: Path | None,
    vocab_size: int,
    max_positions: int,
    eos_token_id: int | None,
    pad_token_id: int | None = None,
):
    """A float32 causal LM in training mode from exactly one source (seed torch first for a fixed init).

    ``vocab_size`` and ``max_positions`` size a preset (and fill a config file's missing vocab size);
    ``eos_token_id``/``pad_token_id`` go into a preset's config.
    """
    from transformers import AutoModelForCausalLM

    check_source(preset, config_file, init_from)
    if init_from is not None:
        model = load_student(init_from)
    else:
        if preset is not None:
            config = llama_config(vocab_size, preset, max_positions)
            config.bos_token_id = config.eos_token_id = eos_token_id
            config.pad_token_id = pad_token_id
        else:
            config = _config_from_file(Path(config_file), vocab_size)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.train()


def load_student(path: Path):
    """A causal LM saved with ``save_pretrained`` (a student, a checkpoint or any HF folder), float32."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise LogitcacheError(f"{path}: no config.json; give a Hugging Face model folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, local_files_only=True)
    except Exception as exc:
        raise LogitcacheError(f"cannot load a causal LM from {path}: {exc}") from exc
    return model.train()


def logits_size(model) -> int:
    """The student's logits dimension (rows of its output head; may exceed the tokenizer's length)."""
    return int(model.get_output_embeddings().weight.shape[0])


def check_context(model, seq_len: int) -> None:
    """Refuse a student that cannot take windows of ``seq_len`` tokens; note one that runs past its config.

    Where the config's context (``max_position_embeddings``, ``n_positions``, ...) is shorter than
    the windows, one window goes through the model: a learned position table (GPT-2's ``wpe``,
    OPT's) fails there, and rotary positions run past the config, as they are computed.
    """
    context = context_length(model.config)
    if context is None or context >= seq_len:
        return
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, seq_len, dtype=torch.long, device=model.device))
    except (IndexError, RuntimeError, ValueError) as exc:
        raise LogitcacheError(
            f"the student takes at most {context} positions (its config) but the windows are {seq_len} tokens, and a "
            f"window fails in its forward ({type(exc).__name__}); give it a longer context or train on shorter windows"
        ) from exc
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info("the student's config gives a context of %d positions, shorter than the %d-token windows; "
                 "its positions are computed past it", context, seq_len)


def check_student(model, manifest: Mapping | None, tokenizer=None, seq_len: int | None = None) -> None:
    """Refuse a student that cannot learn from the data.

    With a cache (``manifest``): the logits dimension must equal the cache's ``vocab_size`` and a
    given tokenizer must be the cache's. From raw text: one logit at least per tokenizer id. With
    ``seq_len``: its positions must reach across a window (:func:`check_context`).
    """
    if seq_len is not None:
        check_context(model, seq_len)
    size = logits_size(model)
    if manifest is not None:
        fingerprint = None if tokenizer is None else tokenizer_fingerprint(tokenizer)
        check_student_vocab(manifest, size, fingerprint)
    elif tokenizer is not None and size < len(tokenizer):
        raise LogitcacheError(
            f"student vocab_size {size} is smaller than the tokenizer's vocabulary ({len(tokenizer)}): "
            "token ids would fall outside the logits"
        )


MODEL_PRESETS = {
    # name: (hidden, layers, heads, intermediate)
    "nano": (64, 2, 2, 128),
    "micro": (128, 2, 4, 256),
    "tiny": (192, 4, 4, 512),
    "small": (384, 6, 6, 1024),
    "base": (768, 12, 12, 3072),
    "large": (2048, 16, 16, 5504),
}


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
