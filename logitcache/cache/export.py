"""``logitcache export``: a cache as a Hugging Face ``datasets`` dataset for trainers outside logitcache.

Both layouts hold one row per window, keep its ``sequence_id`` and its ``input_ids``, and are
written with ``Dataset.save_to_disk`` (open with ``datasets.load_from_disk``). Position ``t`` of a
window is, as in the shards, the teacher's distribution over token ``t + 1``.

``hf`` (lossless; TRL or a custom loop): the shard columns with the flat per-id lists cut into one
list per position: ``target_ids [n-1][k_t] int32``, ``target_logprobs [n-1][k_t] float32`` (the
stored values, exactly; absent where the cache has none: a sample cache built with ``--logprob-bits 0``),
``gold_logprob [n-1] float32``, and ``tail_logprob [n-1] float32``
(topk) or ``target_counts [n-1][k_t] uint16`` (sample); a cache of generated responses (v3 chat) adds
``behavior_logprob [n-1] float32`` (NaN where a token was not drawn), for on-policy losses elsewhere.

``axolotl``: the rows axolotl's knowledge-distillation trainer consumes. Read at
axolotl-ai-cloud/axolotl commit 067b021c (July 2026):

- ``src/axolotl/utils/data/shared.py`` (``_load_from_local_path``) opens a local folder with
  ``load_from_disk``; ``src/axolotl/utils/data/wrappers.py`` (``_is_dataset_already_tokenized``) uses
  a dataset that has ``input_ids``, ``attention_mask`` and ``labels`` as it is, with no prompt strategy.
- ``integrations/kd/collator.py`` (``DataCollatorForKD``) takes per row ``target_token_ids``,
  ``target_logprobs`` and ``target_mask``, lists of per-position lists; it pads each position to
  the batch's largest K (id 0, log-prob -1e9, mask 0) and the positions to the padded length.
  With sample packing (``KDBatchSamplerDataCollatorForSeq2Seq``) a row's lists are concatenated
  with the next row's, so each row must have one target list per input token.
- ``integrations/kd/trainer.py`` and ``kernels/liger.py``: target row ``t`` meets the student's
  hidden state ``t`` (the CE labels are shifted by one there, the targets are not); entries with
  mask 0 are dropped; ``target_logprobs`` are taken as already normalised at ``kd_temperature``
  ("already temp-scaled and normalized"), while the student's logits are divided by
  ``kd_temperature`` and the loss multiplied by its square; ``kd_normalize_topk`` renormalises the
  student's log-probs over the K ids; ``kd_beta`` 0 is forward KL.
- ``integrations/kd/chat_template.py`` (``transform_logprobs``), the layout's own producer,
  renormalises each position's top-k probabilities to sum 1, then raises them to
  ``T_gen / kd_temperature`` and renormalises again.

So each row holds ``input_ids``, ``attention_mask`` (ones), ``labels`` (= ``input_ids``, but -100 at a
token whose position stores no targets: a chat's non-assistant tokens, so that axolotl's CE term skips
them as the cache does) and ``n``
target lists: positions ``0 .. n-2`` from the cache with mask 1, and a last one (there is no
token ``n``) of id 0, log-prob -1e9 and mask 0. The target log-probs are at temperature 1
(use ``kd_temperature: 1``) and normalised over the position's stored ids:

- ``topk``: ``log(p_i / sum_j p_j)``, axolotl's own renormalisation. Lost: the tail mass
  (``tail_logprob``) and the absolute teacher log-probs; ``--to hf`` keeps both.
- ``sample``: RS-KD's self-normalised importance weights, ``log(w_i / sum_j w_j)`` with
  ``w_i = count_i * exp((1 - 1/tau) * logprob_i)`` (``count_i / N`` for a proposal at the teacher's
  temperature), the distribution logitcache's ``rs-kd`` loss trains on. axolotl has no field for
  counts; with ``kd_beta: 0`` and ``kd_normalize_topk: false`` its forward KL against these targets
  differs from RS-KD's loss by a constant (the targets' entropy), so the gradients are RS-KD's
  (unbiased for the full-distribution KD gradient when ``tau = 1``; self-normalised, hence
  slightly biased but consistent, otherwise). ``kd_normalize_topk: true`` renormalises the student
  over the sampled ids, which biases it. Lost: the counts themselves (only their ratios survive)
  and the teacher's log-probs of the sampled ids; ``--to hf`` keeps both.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetInfo, concatenate_datasets

from logitcache.cache.format import WindowTargets, leading_mask, list_column, read_shard
from logitcache.cache.manifest import check_complete, read_manifest
from logitcache.errors import LogitcacheError
from logitcache.files import TMP_SUFFIX, replace_folder

LAYOUTS = ("axolotl", "hf")


# axolotl's own padding of a target entry (integrations/kd/collator.py): id 0, log-prob -1e9, mask 0.
PAD_LOGPROB = -1e9


def _per_position(values: np.ndarray, lengths: np.ndarray, positions: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    """Flat per-id ``values [S]`` → one list per window of one list per position; ``lengths [B, P]``
    padded after each window's ``positions [B]``."""
    offsets = np.zeros(len(positions) + 1, dtype=np.int64)
    np.cumsum(positions, out=offsets[1:])
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)),
        list_column(values, lengths[leading_mask(positions, lengths.shape[1])], arrow_type),
    )


def _windowlist_column(values: np.ndarray, counts: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    """``values [B, W]`` → one list per window of its first ``counts [B]`` values."""
    return list_column(values[leading_mask(counts, values.shape[1])], counts, arrow_type)


def log_normalise(logits: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``logits [S] float64`` minus each position's logsumexp; positions are consecutive runs of ``lengths [P]`` (all > 0)."""
    assert lengths.min(initial=1) > 0, "a position without ids"
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    peak = np.repeat(np.maximum.reduceat(logits, starts), lengths)
    total = np.repeat(np.log(np.add.reduceat(np.exp(logits - peak), starts)), lengths)
    return logits - peak - total


def axolotl_logprobs(targets: WindowTargets, proposal_temperature: float) -> np.ndarray:
    """The axolotl target log-probs ``[S] float64``: each position's stored distribution, normalised over its ids.

    topk: ``log(p_i / sum p)``; sample: ``log(w_i / sum w)``, ``w_i = count_i * exp((1 - 1/tau) * logprob_i)``
    (the weights of ``losses.sparse.rs_kd_log_weights``).
    """
    if targets.method == "sample":
        logits = np.log(targets.target_counts.astype(np.float64))
        if proposal_temperature != 1.0:  # (a cache without log-probabilities has tau = 1)
            logits += (1.0 - 1.0 / proposal_temperature) * targets.target_logprobs.astype(np.float64)
    else:
        logits = targets.target_logprobs.astype(np.float64)
    lengths = targets.target_lengths.reshape(-1).astype(np.int64)
    return log_normalise(logits, lengths[lengths > 0])  # padding (and positions without targets) holds no entries


def _hf_table(targets: WindowTargets) -> pa.Table:
    lengths = targets.target_lengths.astype(np.int64)
    tokens = targets.tokens()
    positions = tokens - 1
    columns = {
        "sequence_id": pa.array(targets.sequence_ids, type=pa.int64()),
        "input_ids": _windowlist_column(targets.input_ids, tokens, pa.int32()),
        "target_ids": _per_position(targets.target_ids, lengths, positions, pa.int32()),
    }
    if targets.target_logprobs is not None:  # (a sample cache built with --logprob-bits 0 has none)
        columns["target_logprobs"] = _per_position(targets.target_logprobs.astype(np.float32), lengths, positions, pa.float32())
    if targets.method == "topk":
        columns["tail_logprob"] = _windowlist_column(targets.tail_logprob.astype(np.float32), positions, pa.float32())
    else:
        columns["target_counts"] = _per_position(targets.target_counts, lengths, positions, pa.uint16())
    columns["gold_logprob"] = _windowlist_column(targets.gold_logprob.astype(np.float32), positions, pa.float32())
    if targets.behavior_logprob is not None:
        columns["behavior_logprob"] = _windowlist_column(targets.behavior_logprob.astype(np.float32), positions, pa.float32())
    return pa.table(columns)


def _labels(targets: WindowTargets) -> np.ndarray:
    """``[B, n]``: the input ids, -100 (ignored by HF losses) at every token whose position stores no targets."""
    labels = targets.input_ids.astype(np.int32)
    labels[:, 1:][targets.target_lengths == 0] = -100
    return labels


def _axolotl_table(targets: WindowTargets, proposal_temperature: float) -> pa.Table:
    lengths = targets.target_lengths.astype(np.int64)
    tokens = targets.tokens()
    # One padding entry closes each window, at its last token: it goes after the window's last stored entry.
    window_ends = np.cumsum(lengths.sum(axis=1))
    padded_lengths = np.concatenate([lengths, np.zeros((len(targets), 1), dtype=np.int64)], axis=1)
    padded_lengths[np.arange(len(targets)), tokens - 1] = 1
    ids = np.insert(targets.target_ids, window_ends, 0)
    logprobs = np.insert(axolotl_logprobs(targets, proposal_temperature).astype(np.float32), window_ends, PAD_LOGPROB)
    mask = np.insert(np.ones(len(targets.target_ids), dtype=np.int8), window_ends, 0)
    return pa.table({
        "sequence_id": pa.array(targets.sequence_ids, type=pa.int64()),
        "input_ids": _windowlist_column(targets.input_ids, tokens, pa.int32()),
        "attention_mask": _windowlist_column(np.ones_like(targets.input_ids, dtype=np.int8), tokens, pa.int8()),
        "labels": _windowlist_column(_labels(targets), tokens, pa.int32()),
        "target_token_ids": _per_position(ids, padded_lengths, tokens, pa.int32()),
        "target_logprobs": _per_position(logprobs, padded_lengths, tokens, pa.float32()),
        "target_mask": _per_position(mask, padded_lengths, tokens, pa.int8()),
    })


def _read(shard: Path) -> WindowTargets:
    try:
        return read_shard(shard)
    except (OSError, pa.ArrowException) as exc:
        raise LogitcacheError(f"{shard}: not a readable shard ({exc}); `logitcache validate` the cache") from exc


def _check_out(cache: Path, out: Path, overwrite: bool) -> None:
    cache, target = Path(cache).resolve(), Path(out).resolve()
    if target == cache or cache in target.parents or target in cache.parents:
        raise LogitcacheError(f"--out {out} overlaps the cache {cache}; export to a folder outside it")
    if target.exists() and not overwrite:
        raise LogitcacheError(f"{out} already exists; choose another --out or pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise LogitcacheError(f"{out} is a file, not a folder; choose another --out")


def export_cache(cache: Path, out: Path, to: str, *, overwrite: bool = False,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Write the cache at ``cache`` as a ``datasets`` dataset in layout ``to`` (see the module docstring) at ``out``.

    Written into a temporary folder and renamed into place: ``out`` is either absent (or as it was) or complete.
    ``progress(rows)`` is called after each shard. Returns what the dataset's description records.
    """
    if to not in LAYOUTS:
        raise LogitcacheError(f"unknown export layout {to!r}; choose one of {', '.join(LAYOUTS)}")
    manifest = read_manifest(cache)
    check_complete(manifest, cache)
    _check_out(cache, out, overwrite)
    if not manifest["shards"]:
        raise LogitcacheError(f"{cache}: the manifest lists no shards; nothing to export")
    tau = float(manifest["params"].get("proposal_temperature", 1.0))
    about = {"logitcache_export": to, "cache_fingerprint": manifest["fingerprint"], "method": manifest["method"],
             "params": manifest["params"], "teacher": manifest["teacher"]["name"], "sequences": manifest["totals"]["sequences"]}
    info = DatasetInfo(description=json.dumps(about, sort_keys=True))

    def write(folder: Path) -> None:
        with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}-parts-") as parts:
            pieces = []
            for shard in manifest["shards"]:
                targets = _read(Path(cache) / shard["file"])
                table = _axolotl_table(targets, tau) if to == "axolotl" else _hf_table(targets)
                path = Path(parts) / f"{shard['index']:05d}.arrow"
                with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
                    writer.write_table(table)
                pieces.append(Dataset.from_file(str(path), info=info))
                if progress is not None:
                    progress(len(targets))
            dataset = concatenate_datasets(pieces)
            dataset.save_to_disk(str(folder))
            del dataset, pieces

    final = Path(out).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        replace_folder(final, write)
    except BaseException:  # replace_folder leaves its temporary folder to the caller
        shutil.rmtree(final.with_name(final.name + TMP_SUFFIX), ignore_errors=True)
        raise
    return about
