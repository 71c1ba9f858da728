"""Corpus → documents → tokens → fixed windows, in one deterministic order.

Sources: plain text (one file = one document), JSON Lines (``.jsonl``, ``.jsonl.zst``; one line =
one document, text in ``text_field``), Parquet (one row = one document), a folder of these (files in
sorted path order, recursively), or a ``datasets`` dataset saved with ``save_to_disk``. Chat and
prompt-response corpora are the same files read as whole records (:meth:`Corpus.records`, used by
:mod:`logitcache.chat`).

Layout (:class:`Layout`, recorded in the manifest and every shard): documents are tokenized with the
teacher's tokenizer without special tokens and each is followed by EOS; a BOS goes in front as the
``bos`` policy says (``auto``: where the tokenizer itself adds one). Then, by ``packing``:

- ``documents`` (the default): one row per document, at most ``seq_len`` tokens; a longer document
  continues in the next rows, each starting with BOS again. The teacher sees each document alone
  (no attention across documents, positions from 0), as a pretrained LLM saw text in training.
- ``stream``: the documents' tokens (BOS, text, EOS, BOS, ...) cut into consecutive windows of
  exactly ``seq_len`` tokens, each window starting with BOS under the policy; attention crosses
  document boundaries. Right for a teacher trained that way (the demo's).

Row ``i`` gets ``sequence_id = i``. Rows of fewer than 2 tokens (no position to predict) and the
remainder after the last full ``stream`` window are dropped and counted as ``dropped_tokens``.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from logitcache.cache.layout import MANIFEST_NAME, shard_name
from logitcache.errors import LogitcacheError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.zst")
PARQUET_SUFFIXES = (".parquet",)
TOKENIZE_BATCH = 256


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES), ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json"))


@dataclass(frozen=True)
class Corpus:
    """A resolved corpus: its files in reading order (or a saved ``datasets`` dataset)."""

    path: Path
    text_field: str
    files: tuple[Path, ...] = ()
    dataset: bool = False

    @staticmethod
    def open(path: str | Path, text_field: str = "text") -> Corpus:
        path = Path(path)
        if not path.exists():
            raise LogitcacheError(f"corpus {path} does not exist")
        if _is_saved_dataset(path):
            return Corpus(path, text_field, dataset=True)
        if path.is_dir() and ((path / MANIFEST_NAME).is_file() or (path / shard_name(0)).is_file()):
            raise LogitcacheError(
                f"corpus {path} is a logitcache cache (shards and manifest), not a text corpus; "
                f"to train from it, use `logitcache train --cache {path}`"
            )
        if path.is_dir():
            files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)))
            if not files:
                raise LogitcacheError(
                    f"corpus folder {path} holds no .txt, .md, .jsonl, .jsonl.zst or .parquet files"
                )
            return Corpus(path, text_field, files=files)
        if _kind(path) is None:
            raise LogitcacheError(
                f"corpus {path}: unknown file type; use .txt/.md, .jsonl, .jsonl.zst, .parquet or a folder"
            )
        return Corpus(path, text_field, files=(path,))

    @property
    def has_fields(self) -> bool:
        """Whether any document comes from a record with fields (JSON Lines, Parquet, a dataset), so
        ``text_field`` matters; plain ``.txt``/``.md`` files are one document each, whatever it says."""
        return self.dataset or any(_kind(f) != "text" for f in self.files)

    def describe(self) -> str:
        if self.dataset:
            return f"datasets dataset at {self.path}"
        return f"{len(self.files)} file(s) under {self.path}"

    def fingerprint(self) -> str:
        """sha256 over the relative names and full contents of the files (or the dataset's own fingerprint)."""
        h = hashlib.sha256()
        if self.dataset:
            h.update(self._load_dataset()._fingerprint.encode())
            return h.hexdigest()
        root = self.path if self.path.is_dir() else self.path.parent
        for f in self.files:
            h.update(str(f.relative_to(root)).encode() + b"\0")
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        return h.hexdigest()

    def documents(self) -> Iterator[str]:
        """Every document's text, in the corpus order."""
        if self.dataset:
            yield from self._dataset_documents()
            return
        for f in self.files:
            kind = _kind(f)
            if kind == "text":
                yield f.read_text(encoding="utf-8", errors="replace")
            elif kind == "jsonl":
                yield from self._jsonl_documents(f)
            else:
                yield from self._parquet_documents(f)

    def _field(self, record: dict, where: str) -> str:
        if self.text_field not in record:
            fields = ", ".join(sorted(record)) or "none"
            raise LogitcacheError(
                f"{where}: no field {self.text_field!r} (fields: {fields}); pick one with --text-field"
            )
        value = record[self.text_field]
        if value is None:  # as a null in Parquet and datasets corpora: an empty document
            return ""
        if not isinstance(value, str):
            raise LogitcacheError(f"{where}: field {self.text_field!r} is {type(value).__name__}, not text")
        return value

    def _jsonl_documents(self, path: Path) -> Iterator[str]:
        for where, record in _jsonl_records(path):
            yield self._field(record, where)

    def records(self) -> Iterator[tuple[str, dict]]:
        """Every record (a JSON line, a Parquet or dataset row, all its fields) with its place
        (``file:line``, ``file row i``), in the corpus order. Plain text files have no records."""
        if self.dataset:
            yield from ((f"{self.path} row {i}", row) for i, row in enumerate(self._load_dataset()))
            return
        for f in self.files:
            kind = _kind(f)
            if kind == "text":
                raise LogitcacheError(f"{f}: plain text holds no records; use .jsonl, .jsonl.zst, .parquet or a datasets dataset")
            if kind == "jsonl":
                yield from _jsonl_records(f)
            else:
                yield from _parquet_records(f)

    def _parquet_documents(self, path: Path) -> Iterator[str]:
        pf = _parquet_file(path)
        if self.text_field not in pf.schema_arrow.names:
            raise LogitcacheError(
                f"{path}: no column {self.text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                "pick one with --text-field"
            )
        kind = pf.schema_arrow.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
            raise LogitcacheError(f"{path}: column {self.text_field!r} holds {kind}, not text; pick one with --text-field")
        for group in range(pf.num_row_groups):
            yield from (t or "" for t in pf.read_row_group(group, columns=[self.text_field]).column(0).to_pylist())

    def _load_dataset(self):
        import datasets

        loaded = datasets.load_from_disk(str(self.path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" in loaded:
                return loaded["train"]
            if len(loaded) == 1:
                return next(iter(loaded.values()))
            raise LogitcacheError(
                f"{self.path}: dataset has splits {', '.join(loaded)} and no 'train'; save the split you want"
            )
        return loaded

    def _dataset_documents(self) -> Iterator[str]:
        ds = self._load_dataset()
        if self.text_field not in ds.column_names:
            raise LogitcacheError(
                f"{self.path}: no column {self.text_field!r} (columns: {', '.join(ds.column_names)}); "
                "pick one with --text-field"
            )
        feature = ds.features[self.text_field]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise LogitcacheError(f"{self.path}: column {self.text_field!r} holds {feature}, not text; pick one with --text-field")
        for batch in ds.select_columns([self.text_field]).iter(batch_size=1024):
            yield from (t or "" for t in batch[self.text_field])


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """The JSON object on each non-blank line, with its place ``path:line``."""
    with _open_text(path) as text:
        for number, line in enumerate(_lines(text, path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LogitcacheError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise LogitcacheError(f"{path}:{number}: expected a JSON object per line")
            yield f"{path}:{number}", record


def _parquet_file(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except Exception as exc:
        raise LogitcacheError(f"{path}: not a readable Parquet file ({exc})") from exc


def _parquet_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Each row of a Parquet file as a dict, with its place ``path row i``."""
    pf = _parquet_file(path)
    rows = (row for group in range(pf.num_row_groups) for row in pf.read_row_group(group).to_pylist())
    yield from ((f"{path} row {i}", row) for i, row in enumerate(rows))


def _lines(text: io.TextIOBase, path: Path) -> Iterator[str]:
    """The lines of ``text``; a damaged ``.zst`` stream is named, not a decoder traceback."""
    if not path.name.lower().endswith(".zst"):
        yield from text
        return
    import zstandard

    try:
        yield from text
    except zstandard.ZstdError as exc:
        raise LogitcacheError(f"{path}: not a readable zstd stream ({exc})") from exc


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
        return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


@dataclass
class PackingStats:
    """What packing saw: documents read, tokens produced, tokens dropped after the last window."""

    documents: int = 0
    tokens: int = 0
    dropped_tokens: int = 0


BOS_POLICIES = ("auto", "always", "never")


PACKINGS = ("documents", "stream")


@dataclass(frozen=True)
class Layout:
    """What the teacher sees of the corpus: a BOS or not, and how documents become rows."""

    packing: str  # one of PACKINGS
    bos_token_id: int | None  # put in front of every document and every row; None: no BOS
    eos_token_id: int  # after every document

    def describe(self, bos_policy: str, corpus_format: str = "text") -> dict:
        """What the manifest and every shard record under ``layout`` (``bos_policy`` ``template``: a chat
        template's own special tokens, see :mod:`logitcache.chat`)."""
        return {"format": corpus_format, "packing": self.packing, "bos": bos_policy, "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id}


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` puts its BOS in front of a text by itself (Llama, Gemma, Mistral: yes; GPT-2, Qwen: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def resolve_layout(tokenizer, bos: str = "auto", packing: str = "documents") -> Layout:
    """The :class:`Layout` of policy ``bos`` (one of BOS_POLICIES) and ``packing`` for ``tokenizer``."""
    if bos not in BOS_POLICIES:
        raise LogitcacheError(f"--bos {bos!r}: choose one of {', '.join(BOS_POLICIES)}")
    if packing not in PACKINGS:
        raise LogitcacheError(f"--packing {packing!r}: choose one of {', '.join(PACKINGS)}")
    if tokenizer.eos_token_id is None:
        raise LogitcacheError("the tokenizer has no EOS token to end documents with")
    if bos == "always" and tokenizer.bos_token_id is None:
        raise LogitcacheError("--bos always: the tokenizer has no BOS token; use --bos auto or never")
    use = bos == "always" or (bos == "auto" and tokenizer_adds_bos(tokenizer))
    return Layout(packing, int(tokenizer.bos_token_id) if use else None, int(tokenizer.eos_token_id))


def token_stream(documents: Iterator[str], tokenizer, eos_id: int, stats: PackingStats) -> Iterator[np.ndarray]:
    """Token ids of each document followed by EOS, tokenized in batches: ``[len] int64`` arrays."""
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            stats.documents += 1
            stats.tokens += len(ids) + 1
            yield np.asarray([*ids, eos_id], dtype=np.int64)
        batch.clear()

    for text in documents:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from flush()
    if batch:
        yield from flush()


def pack_windows(pieces: Iterator[np.ndarray], seq_len: int, stats: PackingStats,
                 bos_id: int | None = None) -> Iterator[np.ndarray]:
    """Cut the concatenated token stream into consecutive windows: ``[seq_len] int64`` each.

    With ``bos_id``, every piece (document) starts with BOS, and so does every window: one cut
    inside a document continues after a BOS of its own (one BOS, not two, where a document starts a window).
    """
    buffer = np.empty(0, dtype=np.int64)
    for piece in pieces:
        if bos_id is not None:
            piece = np.concatenate([[bos_id], piece])
            stats.tokens += 1
        buffer = np.concatenate([buffer, piece])
        while len(buffer) >= seq_len:
            yield buffer[:seq_len]
            buffer = buffer[seq_len:]
            if bos_id is not None and len(buffer) and buffer[0] != bos_id:
                buffer = np.concatenate([[bos_id], buffer])
                stats.tokens += 1
    stats.dropped_tokens = len(buffer)


def document_rows(pieces: Iterator[np.ndarray], seq_len: int, stats: PackingStats,
                  bos_id: int | None = None) -> Iterator[np.ndarray]:
    """One row per document (``[<= seq_len] int64``), a longer one continued in rows of its own, each
    starting with ``bos_id`` when given. Rows of fewer than 2 tokens are dropped (nothing to predict), and so
    are empty documents and a continuation that would hold only the EOS; all counted in ``dropped_tokens``."""
    body = seq_len - (bos_id is not None)
    if body < 1:
        raise LogitcacheError(f"--seq-len {seq_len}: too short for a BOS and a token")
    for piece in pieces:
        if len(piece) == 1:  # an empty document: its EOS alone predicts nothing of it
            stats.dropped_tokens += 1
            continue
        for start in range(0, len(piece), body):
            row = piece[start : start + body]
            if start and len(row) == 1:  # only the EOS is left over: a row of BOS + EOS would teach nothing
                stats.dropped_tokens += 1
                continue
            if bos_id is not None:
                row = np.concatenate([[bos_id], row])
                stats.tokens += 1
            if len(row) < 2:
                stats.dropped_tokens += len(row)
                continue
            yield row


def layout_rows(documents: Iterator[str], tokenizer, layout: Layout, seq_len: int, stats: PackingStats) -> Iterator[np.ndarray]:
    """``documents`` as the rows of ``layout``: ``[n] int64`` token ids each, ``n <= seq_len``."""
    pieces = token_stream(documents, tokenizer, layout.eos_token_id, stats)
    rows = document_rows if layout.packing == "documents" else pack_windows
    return rows(pieces, seq_len, stats, layout.bos_token_id)


def pad_rows(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
    """``rows`` right-padded with 0 into ``[B, n] int64`` (``n`` the longest) and their token counts
    ``[B] int64``, or None where every row is ``n`` long (nothing padded)."""
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    n = int(counts.max())
    if (counts == n).all():
        return np.stack(rows), None
    batch = np.zeros((len(rows), n), dtype=np.int64)
    for out, row in zip(batch, rows):
        out[: len(row)] = row
    return batch, counts
