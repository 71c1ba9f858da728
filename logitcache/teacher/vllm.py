"""The ``vllm`` teacher backend: :class:`VLLMTeacher`, with the interface of :class:`~logitcache.teacher.hf.HFTeacher`.

Supported vLLM: 0.12 to 0.33 (facts below read from its source at 0.12.0, 0.20.0 and 0.33.0).
``SamplingParams.flat_logprobs`` first appears in 0.12.0; older versions hand prompt log-probabilities
back as one Python dict per position, which is what makes a large k slow, so they are refused.

topk. One ``LLM.generate`` per group of windows, with
``SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)``.
``RequestOutput.prompt_logprobs`` is then a ``FlatLogprobs`` (vllm/logprobs.py): flat lists
``token_ids``, ``logprobs``, ``ranks``, ``decoded_tokens`` and, per entry, ``start_indices`` and
``end_indices``. Entry 0 is empty (nothing predicts the first token). Entry ``j >= 1`` is the
distribution over prompt token ``j`` given the tokens before it, and holds exactly ``k + 1`` values:
first the prompt token itself (its log-probability and true rank), then the top-k in descending order
(ranks 1..k). The flat layout does not merge duplicates: the prompt token appears twice when it is in
the top-k (the dict layout merges them, hence its "k or k + 1" entries). Our position ``t`` (the
distribution over token ``t + 1``) is vLLM's entry ``t + 1``: its first value is our gold
log-probability, the other ``k`` our targets. The values are the float32 log-softmax of the raw logits
(``logprobs_mode="raw_logprobs"``, temperature 1, after the model's own logit transforms).

Tail. vLLM gives no tail mass, so it is derived as ``log(1 - sum(exp(top-k)))`` in float64. The
log-probabilities are float32, so the sum is uncertain by about 1e-7: tails below :data:`TAIL_FLOOR`
(2**-20, log ≈ -13.9) cannot be told apart from rounding and are clamped there. The hf backend takes the
exact ``logsumexp`` of the rest and may store smaller tails; either is far below what a loss can see.

sample. vLLM cannot sample at prompt positions nor return full prompt logits. The pooling runner
(``runner="pooling"``, ``convert="embed"``, ``pooling_type="ALL"``, normalisation off,
``pooling_task="token_embed"``) returns the final hidden states of every token; the output head (its
weight and bias read from the checkpoint's safetensors, with the config's logit transforms:
:func:`logitcache.teacher.head.output_head`) then runs on our GPU through
:func:`logitcache.teacher.host.targets_from_hidden`, the sampler path of the hf backend. Before the
first batch, a generate engine scores the first :data:`CHECK_WINDOWS` windows (at most
:data:`CHECK_TOKENS` tokens each) with prompt log-probabilities; the head's log-probabilities at those
top ids must agree within the dtype's tolerance, else the build is refused. Cost, once per worker: one extra engine start (weights loaded twice, eager mode, no CUDA
graphs) and a forward pass over a few hundred tokens.

Memory. vLLM computes prompt log-probabilities outside its memory profile: ``[rows, V]`` logits in the
model dtype plus their float32 log-softmax, for one request's chunk at a time, with rows per engine step
capped by ``max_num_batched_tokens`` (chunked prefill on). We set that cap so that
``rows × V × 12 bytes ≤ chunk_mib`` (default 2048 MiB; clamped to [256, 16384] tokens), the same budget
and formula as the hf backend's head chunks; it must fit in the memory vLLM leaves free
(``1 - gpu_memory_utilization`` of the GPU), together with the head weight in sample mode. That is
how vLLM 0.12's model runner works; by the source of later releases (0.33 read, not run), their
default "model runner V2" computes prompt log-probabilities in blocks of 1024 rows itself, so
there the cap is only conservative: it limits prefill tokens per engine step, and a larger
``--chunk-mib`` lifts it (not yet measured on a GPU). On the host,
FlatLogprobs holds Python objects (about 128 bytes per value), so a batch of windows is split into calls
holding at most :data:`HOST_BYTES_PER_CALL` of them (or of float32 pooled hidden states).
"""

from __future__ import annotations

import gc
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logitcache.cache.format import WindowTargets
from logitcache.errors import LogitcacheError
from logitcache.targets.spec import TargetSpec
from logitcache.teacher.folder import context_length, load_tokenizer, weights_fingerprint
from logitcache.teacher.head import head_chunk_rows, output_head
from logitcache.teacher.host import PendingTargets, targets_from_hidden
from logitcache.teacher.options import TeacherOptions

MIN_VERSION = (0, 12)
MAX_VERSION = (0, 33)
INSTALL_HINT = "pip install 'logitcache[vllm]' on a GPU machine"
TAIL_FLOOR = 2.0**-20
DEFAULT_CHUNK_MIB = 2048
MIN_TOKENS_PER_STEP = 256
MAX_TOKENS_PER_STEP = 16384
PROMPT_VALUE_BYTES = 128
HOST_BYTES_PER_CALL = 1 << 30
CHECK_WINDOWS = 2
CHECK_TOKENS = 256
CHECK_K = 20
CHECK_TOLERANCE = {"float32": 1e-2, "float16": 0.1, "bfloat16": 0.25}


# ---------------------------------------------------------------------------------------------------
# Pure functions: vLLM's plain output objects → numpy, and the sizes that bound memory.


def parse_version(version: str) -> tuple[int, int]:
    """``"0.20.1+cu129"`` → ``(0, 20)``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise LogitcacheError(f"cannot read the vLLM version {version!r}")
    return int(match.group(1)), int(match.group(2))


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM outside :data:`MIN_VERSION`..:data:`MAX_VERSION` (major, minor)."""
    if not MIN_VERSION <= parse_version(version) <= MAX_VERSION:
        low, high = (".".join(map(str, v)) for v in (MIN_VERSION, MAX_VERSION))
        raise LogitcacheError(
            f"vLLM {version} is not supported by --backend vllm: need {low} to {high}.x "
            f"({low} added flat prompt log-probabilities; later versions are unverified); "
            f"pip install 'vllm>={low},<{MAX_VERSION[0]}.{MAX_VERSION[1] + 1}'"
        )


def prompt_topk(prompt_token_ids: Sequence[int], prompt_logprobs, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One request's flat prompt log-probabilities → our positions ``0 .. n-2``.

    ``prompt_logprobs`` is shaped like vLLM's ``FlatLogprobs`` for a prompt of ``n`` tokens asked for
    ``prompt_logprobs=k``. Returns top ids ``[n-1, k] int64`` and log-probabilities ``[n-1, k] float64``
    (descending) and the actual next token's log-probability ``[n-1] float64``.
    """
    tokens = np.asarray(prompt_token_ids, dtype=np.int64)
    n, width = len(tokens), k + 1
    starts = np.asarray(getattr(prompt_logprobs, "start_indices", ()), dtype=np.int64)
    ends = np.asarray(getattr(prompt_logprobs, "end_indices", ()), dtype=np.int64)
    entry = np.arange(n, dtype=np.int64)
    if not (np.array_equal(starts, np.maximum(entry - 1, 0) * width) and np.array_equal(ends, entry * width)):
        raise LogitcacheError(
            f"vLLM returned prompt log-probabilities in an unexpected layout for a prompt of {n} tokens: "
            f"expected flat logprobs (flat_logprobs=True) with entry 0 empty and {width} values per later "
            "entry (the prompt token, then the top-k)"
        )
    ids = np.asarray(prompt_logprobs.token_ids, dtype=np.int64).reshape(n - 1, width)
    logprobs = np.asarray(prompt_logprobs.logprobs, dtype=np.float64).reshape(n - 1, width)
    if not np.array_equal(ids[:, 0], tokens[1:]):
        raise LogitcacheError(
            "vLLM's prompt log-probabilities are not aligned with the prompt tokens (entry j must score token j)"
        )
    return ids[:, 1:], logprobs[:, 1:], logprobs[:, 0]


def tail_logprob(topk_logprobs: np.ndarray) -> np.ndarray:
    """``log(1 - sum(exp(topk_logprobs)))`` over the last axis, in float64, floored at :data:`TAIL_FLOOR`."""
    covered = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)
    return np.log(np.maximum(1.0 - covered, TAIL_FLOOR))


def prompts_of(input_ids: np.ndarray, token_counts: np.ndarray | None = None) -> list[np.ndarray]:
    """Each row of ``input_ids [B, n]`` without its right padding (``token_counts [B]``; None: full rows)."""
    if token_counts is None:
        return list(input_ids)
    return [row[:count] for row, count in zip(input_ids, np.asarray(token_counts).tolist())]


def _check_prompts(outputs: Sequence, prompts: list[np.ndarray]) -> None:
    if len(outputs) != len(prompts):
        raise LogitcacheError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} windows")
    for output, prompt in zip(outputs, prompts):
        if not np.array_equal(np.asarray(output.prompt_token_ids), prompt):
            raise LogitcacheError("vLLM returned outputs whose prompt tokens differ from the windows sent")


def _scatter(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``values`` of the True positions of ``mask`` in place, zeros elsewhere: ``[len(mask)]``."""
    out = np.zeros(len(mask), dtype=values.dtype)
    out[mask] = values
    return out


def _padded(per_row: list[np.ndarray], width: int, dtype: type) -> np.ndarray:
    """``[B, width]`` of rows of different lengths, zeros after each."""
    out = np.zeros((len(per_row), width), dtype=dtype)
    for row, values in zip(out, per_row):
        row[: len(values)] = values
    return out


def topk_window_targets(outputs: Sequence, input_ids: np.ndarray, sequence_ids: np.ndarray, k: int,
                        token_counts: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> WindowTargets:
    """``RequestOutput``-shaped objects (one per row of ``input_ids [B, n]``, rows of ``token_counts``
    tokens) → :class:`WindowTargets`; only the positions of ``target_mask [B, n-1]`` (None: all) are kept."""
    prompts = prompts_of(input_ids, token_counts)
    _check_prompts(outputs, prompts)
    b, n = input_ids.shape
    per_window = [prompt_topk(prompt, output.prompt_logprobs, k) for output, prompt in zip(outputs, prompts)]
    # vLLM scores every prompt position: keep the asked ones, store nothing (and gold 0) at the others
    kept = [np.ones(len(p) - 1, dtype=bool) if target_mask is None else target_mask[i, : len(p) - 1]
            for i, p in enumerate(prompts)]
    ids = [top[m] for (top, _, _), m in zip(per_window, kept)]
    logprobs = [lp[m] for (_, lp, _), m in zip(per_window, kept)]
    gold = [np.where(m, g, 0.0) for (_, _, g), m in zip(per_window, kept)]
    tails = [_scatter(tail_logprob(lp), m) for lp, m in zip(logprobs, kept)]
    lengths = [np.where(m, k, 0) for m in kept]
    return WindowTargets(
        sequence_ids=np.asarray(sequence_ids, dtype=np.int64),
        input_ids=_padded(prompts, n, np.int32),
        target_lengths=_padded(lengths, n - 1, np.uint16),
        target_ids=np.concatenate(ids).reshape(-1).astype(np.int32),
        target_logprobs=np.concatenate(logprobs).reshape(-1).astype(np.float32),
        gold_logprob=_padded(gold, n - 1, np.float32),
        tail_logprob=_padded(tails, n - 1, np.float32),
        token_counts=None if token_counts is None else np.asarray(token_counts, dtype=np.int64),
    )


def pooled_hidden(outputs: Sequence, input_ids: np.ndarray, token_counts: np.ndarray | None = None) -> torch.Tensor:
    """``PoolingRequestOutput``-shaped objects of ALL pooling → hidden states ``[B, n, H]`` (zeros after
    each row's ``token_counts``)."""
    prompts = prompts_of(input_ids, token_counts)
    _check_prompts(outputs, prompts)
    hidden = [output.outputs.data for output in outputs]
    if any(h.ndim != 2 or h.shape[0] != len(p) for h, p in zip(hidden, prompts)):
        raise LogitcacheError("vLLM's pooling runner did not return one hidden state per token (is pooling_type ALL?)")
    n = input_ids.shape[1]
    return torch.stack([torch.nn.functional.pad(h, (0, 0, 0, n - h.shape[0])) for h in hidden])


def _part(values: np.ndarray | None, start: int, step: int) -> np.ndarray | None:
    return None if values is None else values[start : start + step]


def tokens_per_step(vocab_size: int, chunk_mib: int) -> int:
    """``max_num_batched_tokens`` that keeps vLLM's prompt-logprob rows × V × 12 bytes within ``chunk_mib``."""
    rows = (chunk_mib << 20) // (vocab_size * 12)
    return int(min(max(rows, MIN_TOKENS_PER_STEP), MAX_TOKENS_PER_STEP))


def windows_per_call(seq_len: int, bytes_per_token: int, budget: int | None = None) -> int:
    """Windows per generate/encode call so that their host-side results stay within ``budget`` bytes."""
    budget = HOST_BYTES_PER_CALL if budget is None else budget
    return max(1, budget // (seq_len * bytes_per_token))


def without_normalisation(*classes: type) -> list[dict]:
    """Keyword arguments that switch off embedding normalisation, per vLLM config class.

    vLLM 0.12 spells it ``normalize=False``; later versions removed that field (and reject it) in
    favour of ``use_activation=False``.
    """
    kwargs = []
    for cls in classes:
        fields = set(getattr(cls, "__struct_fields__", ())) | set(getattr(cls, "__dataclass_fields__", {}))
        kwargs.append({"normalize": False} if "normalize" in fields else {"use_activation": False})
    return kwargs


# ---------------------------------------------------------------------------------------------------
# I/O at the edges: importing vLLM, reading the output head from the checkpoint.


@dataclass(frozen=True)
class VLLMApi:
    """The parts of vLLM this backend uses (a seam for tests that have no vLLM)."""

    version: str
    LLM: type
    SamplingParams: type
    TokensPrompt: type
    PoolingParams: type
    PoolerConfig: type
    cleanup: Callable[[], None] | None = None


def import_vllm() -> VLLMApi:
    """Import vLLM, refusing clearly when it is missing, unsupported, or has no CUDA GPU to run on."""
    try:
        import vllm
    except ImportError as exc:
        raise LogitcacheError(f"--backend vllm needs vLLM, which is not installed ({exc}); {INSTALL_HINT}") from exc
    except Exception as exc:  # a broken install fails in many ways (CUDA libraries, torch mismatch)
        raise LogitcacheError(
            f"vLLM is installed but fails to import ({type(exc).__name__}: {exc}); {INSTALL_HINT}"
        ) from exc
    check_vllm_version(vllm.__version__)
    if not torch.cuda.is_available():
        raise LogitcacheError(f"--backend vllm needs a CUDA GPU and torch sees none; {INSTALL_HINT}, or use --backend hf")
    from vllm import LLM, PoolingParams, SamplingParams
    from vllm.config import PoolerConfig
    from vllm.inputs import TokensPrompt

    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory as cleanup
    except ImportError:
        cleanup = None
    return VLLMApi(vllm.__version__, LLM, SamplingParams, TokensPrompt, PoolingParams, PoolerConfig, cleanup)


def load_text_config(path: Path):
    """The (text) model config of a Hugging Face checkpoint directory."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise LogitcacheError(f"cannot read the model config in {path}: {exc}") from exc
    return config.get_text_config()


def head_names(config) -> tuple[list[str], list[str]]:
    """Checkpoint names the output head's weight may be stored under, and its bias's (none without one),
    most likely first.

    The model's own names (tied embeddings give several), then the names transformers saves them
    under where it renames weights on loading (GPT-NeoX's ``embed_out``), then each without the
    base model's prefix (a checkpoint saved from the base model, as GPT-2's and OPT's on the Hub).
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise LogitcacheError(f"cannot build {type(config).__name__} to find its output head: {exc}") from exc
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise LogitcacheError(f"{type(model).__name__} has no plain output head; --method sample cannot use --backend vllm")
    bias = getattr(head, "bias", None)
    return _checkpoint_names(model, head.weight), (_checkpoint_names(model, bias) if bias is not None else [])


def _checkpoint_names(model, parameter: torch.Tensor) -> list[str]:
    own = {name: p for name, p in model.named_parameters(remove_duplicate=False) if p is parameter}
    names = [*own, *_saved_names(model, own)]
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else None
    names += [name.removeprefix(prefix) for name in names if prefix and name.startswith(prefix)]
    return list(dict.fromkeys(names))


def _saved_names(model, parameters: dict[str, torch.Tensor]) -> list[str]:
    """The names ``model.save_pretrained`` writes ``parameters`` under: transformers 5 reverts the
    renamings it applies on loading; earlier versions rename nothing."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return []
    return list(revert_weight_conversion(model, parameters))


def load_head(path: Path, config) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output head's weight ``[V, H]`` and bias ``[V]`` (None without one), in the checkpoint's dtype
    on the CPU, from the checkpoint's safetensors."""
    path = Path(path)
    weight_names, bias_names = head_names(config)
    weight = _read_tensor(path, weight_names)
    bias = _read_tensor(path, bias_names) if bias_names else None
    for tensor, names, what in ((weight, weight_names, "weight"), (bias, bias_names, "bias")):
        if tensor is None and names:
            raise LogitcacheError(
                f"teacher {path}: no output head {what} ({' or '.join(names)}) in its safetensors files; "
                "--method sample with --backend vllm needs a safetensors checkpoint with an unquantised head"
            )
    return weight, bias


def _read_tensor(path: Path, names: list[str]) -> torch.Tensor | None:
    """The first of ``names`` found in the safetensors files of ``path`` (by its index if it has one)."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        candidates = [(name, path / weight_map[name]) for name in names if name in weight_map]
    else:
        candidates = [(name, file) for name in names for file in sorted(path.glob("*.safetensors"))]
    for name, file in candidates:
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return None


def head_gap(reference_ids: torch.Tensor, reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Largest ``|logprobs[r, reference_ids[r, j]] - reference_logprobs[r, j]|`` over rows ``r`` and ids ``j``."""
    return float((logprobs.gather(1, reference_ids) - reference_logprobs).abs().max())


# ---------------------------------------------------------------------------------------------------


class JoinedTargets:
    """Targets of consecutive groups of windows, each finished (``WindowTargets``) or pending
    (:class:`~logitcache.teacher.host.PendingTargets`); :meth:`result` waits for each and joins them."""

    def __init__(self, parts: list[WindowTargets | PendingTargets]) -> None:
        self.parts = parts

    def result(self) -> WindowTargets:
        return WindowTargets.concat([p if isinstance(p, WindowTargets) else p.result() for p in self.parts])


class VLLMTeacher:
    """A Hugging Face checkpoint served by vLLM (CUDA only); same interface as :class:`HFTeacher`.

    Engines are started lazily: a generate engine for ``topk`` (and for the sample path's check), a
    pooling engine for ``sample``; one engine is alive at a time.
    """

    backend = "vllm"

    def __init__(self, path: str | Path, options: TeacherOptions) -> None:
        self.api = import_vllm()
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise LogitcacheError(f"teacher {self.path}: no config.json; give a Hugging Face model directory")
        self.options = options
        self.tokenizer = load_tokenizer(self.path)
        self.config = load_text_config(self.path)
        self.vocab_size = int(self.config.vocab_size)
        context = context_length(self.config)
        # vLLM's generate runner refuses a prompt that fills max_model_len: it must fit one output token.
        self.max_positions = context - 1 if context else None
        self.dtype = options.dtype or "bfloat16"
        self.chunk_mib = options.chunk_mib or DEFAULT_CHUNK_MIB
        self.head_device = torch.device(options.device or "cuda")
        self.head_weight: torch.Tensor | None = None
        self.head_bias: torch.Tensor | None = None
        self._engine = None
        self._engine_kind: str | None = None
        self._verified = False

    @property
    def chunk_rows(self) -> int:
        return head_chunk_rows(self.chunk_mib, self.vocab_size)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The teacher's output head (bias and logit transforms included), as in the hf backend."""
        return output_head(hidden, self.head_weight, self.config, self.head_bias)

    def describe(self) -> dict:
        return {
            "backend": self.backend,
            "path": str(self.path.resolve()),
            "name": self.path.name,
            "architecture": (getattr(self.config, "architectures", None) or [type(self.config).__name__])[0],
            "dtype": self.dtype,
            "fingerprint": weights_fingerprint(self.path),
            "vocab_size": self.vocab_size,
            "vllm_version": self.api.version,
            "tensor_parallel_size": self.options.tensor_parallel_size,
        }

    @torch.inference_mode()
    def compute_async(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec,
                      token_counts: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> JoinedTargets:
        """Targets of rows ``input_ids [B, n] int64`` with ids ``sequence_ids [B] int64``.

        ``token_counts [B]``: tokens of each right-padded row (None: all full); each row goes to
        vLLM as a prompt of its own, without its padding; only ``target_mask [B, n-1]``'s positions
        (None: all) get targets. vLLM's calls return when their work is
        done, so only the sample path's head (on our GPU) may still be copying to the host when this returns.
        """
        if spec.method == "topk":
            return self._topk(input_ids, sequence_ids, spec.k, token_counts, target_mask)
        if not self._verified:
            first = input_ids.shape[1] if token_counts is None else int(np.min(token_counts[:CHECK_WINDOWS]))
            self._check_head(input_ids[:CHECK_WINDOWS, : min(CHECK_TOKENS, first)])
        return self._sample(input_ids, sequence_ids, spec, token_counts, target_mask)

    def compute(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec,
                token_counts: np.ndarray | None = None, target_mask: np.ndarray | None = None) -> WindowTargets:
        return self.compute_async(input_ids, sequence_ids, spec, token_counts, target_mask).result()

    # -- topk ---------------------------------------------------------------------------------------

    def _prompt_logprobs(self, input_ids: np.ndarray, k: int, token_counts: np.ndarray | None = None) -> list:
        llm = self._engine_for("generate")
        params = self.api.SamplingParams(prompt_logprobs=k, max_tokens=1, detokenize=False, flat_logprobs=True)
        prompts = [self.api.TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts_of(input_ids, token_counts)]
        return llm.generate(prompts, params, use_tqdm=False)

    def _topk(self, input_ids: np.ndarray, sequence_ids: np.ndarray, k: int, token_counts: np.ndarray | None,
              target_mask: np.ndarray | None) -> JoinedTargets:
        step = windows_per_call(input_ids.shape[1], (k + 1) * PROMPT_VALUE_BYTES)
        parts = []
        for start in range(0, len(input_ids), step):
            windows, counts = input_ids[start : start + step], _part(token_counts, start, step)
            outputs = self._prompt_logprobs(windows, k, counts)
            parts.append(topk_window_targets(outputs, windows, sequence_ids[start : start + step], k, counts,
                                             _part(target_mask, start, step)))
        return JoinedTargets(parts)

    # -- sample -------------------------------------------------------------------------------------

    def _hidden(self, input_ids: np.ndarray, token_counts: np.ndarray | None = None) -> torch.Tensor:
        """Final hidden states ``[B, n, H]`` from the pooling runner, on the head's device and dtype."""
        llm = self._engine_for("pooling")
        (pooling_kwargs,) = without_normalisation(self.api.PoolingParams)
        prompts = [self.api.TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts_of(input_ids, token_counts)]
        outputs = llm.encode(prompts, pooling_params=self.api.PoolingParams(**pooling_kwargs),
                             pooling_task="token_embed", use_tqdm=False)
        return pooled_hidden(outputs, input_ids, token_counts).to(self.head_device, self.head_weight.dtype)

    def _sample(self, input_ids: np.ndarray, sequence_ids: np.ndarray, spec: TargetSpec,
                token_counts: np.ndarray | None, target_mask: np.ndarray | None) -> JoinedTargets:
        step = windows_per_call(input_ids.shape[1], int(self.config.hidden_size) * 4)
        parts = []
        for start in range(0, len(input_ids), step):
            windows, counts = input_ids[start : start + step], _part(token_counts, start, step)
            hidden = self._hidden(windows, counts)[:, :-1]
            ids = torch.from_numpy(windows).to(self.head_device)
            seq = sequence_ids[start : start + step]
            rows = head_chunk_rows(self.chunk_mib, self.vocab_size, spec)
            parts.append(targets_from_hidden(hidden, ids, seq, self.head, spec, rows, counts, _part(target_mask, start, step)))
        return JoinedTargets(parts)

    def _check_head(self, windows: np.ndarray) -> None:
        """Refuse a head whose log-probs differ from vLLM's own prompt log-probs on ``windows``."""
        k = min(CHECK_K, self.vocab_size)
        reference = [prompt_topk(w, out.prompt_logprobs, k) for w, out in zip(windows, self._prompt_logprobs(windows, k))]
        ref_ids = torch.from_numpy(np.concatenate([r[0] for r in reference])).to(self.head_device)
        ref_logprobs = torch.from_numpy(np.concatenate([r[1] for r in reference])).float().to(self.head_device)
        self._load_head()
        rows = self._hidden(windows)[:, :-1].reshape(ref_ids.shape[0], -1)
        gap = 0.0
        for start in range(0, rows.shape[0], self.chunk_rows):
            chunk = slice(start, start + self.chunk_rows)
            logprobs = torch.log_softmax(self.head(rows[chunk]), dim=-1)
            gap = max(gap, head_gap(ref_ids[chunk], ref_logprobs[chunk], logprobs))
        tolerance = CHECK_TOLERANCE.get(self.dtype, 0.25)
        if gap > tolerance:
            raise LogitcacheError(
                f"teacher {self.path}: the output head applied to vLLM's pooled hidden states differs from "
                f"vLLM's own prompt log-probabilities by {gap:.3g} (tolerance {tolerance} in {self.dtype}); this "
                "architecture post-processes logits in a way logitcache does not know: use --backend hf for --method sample"
            )
        self._verified = True

    def _load_head(self) -> None:
        if self.head_weight is None:
            weight, bias = load_head(self.path, self.config)
            dtype = getattr(torch, self.dtype)
            self.head_weight = weight.to(self.head_device, dtype)
            self.head_bias = bias.to(self.head_device, dtype) if bias is not None else None

    # -- engines ------------------------------------------------------------------------------------

    def _engine_args(self, kind: str) -> dict:
        """``LLM(...)`` keyword arguments for a ``generate`` or ``pooling`` engine."""
        s = self.options
        args = {
            "model": str(self.path),
            "tokenizer": str(self.path),
            "dtype": self.dtype,
            "tensor_parallel_size": s.tensor_parallel_size,
            "gpu_memory_utilization": s.gpu_memory_utilization,
            "max_model_len": s.seq_len + 1,
            "seed": s.spec.seed,
        }
        if kind == "pooling":
            (pooler_kwargs,) = without_normalisation(self.api.PoolerConfig)
            pooler = self.api.PoolerConfig(pooling_type="ALL", **pooler_kwargs)
            return {**args, "runner": "pooling", "convert": "embed", "pooler_config": pooler,
                    **({"max_num_seqs": s.max_num_seqs} if s.max_num_seqs else {})}
        max_num_seqs = s.max_num_seqs or min(256, tokens_per_step(self.vocab_size, self.chunk_mib))
        return {
            **args,
            "max_logprobs": max(s.spec.k, CHECK_K),
            "logprobs_mode": "raw_logprobs",
            "enable_prefix_caching": False,
            "enable_chunked_prefill": True,
            "max_num_batched_tokens": max(tokens_per_step(self.vocab_size, self.chunk_mib), max_num_seqs),
            "max_num_seqs": max_num_seqs,
            # The sample path's check engine runs a few hundred tokens once: skip CUDA graph capture.
            "enforce_eager": s.spec.method == "sample",
        }

    def _engine_for(self, kind: str):
        if self._engine_kind != kind:
            self.close()
            try:
                self._engine = self.api.LLM(**self._engine_args(kind))
            except Exception as exc:
                what = "vLLM's pooling runner cannot serve this architecture; use --backend hf for --method sample" \
                    if kind == "pooling" else "vLLM cannot start this teacher"
                raise LogitcacheError(f"teacher {self.path}: {what} ({type(exc).__name__}: {exc})") from exc
            self._engine_kind = kind
        return self._engine

    def close(self) -> None:
        """Shut the running engine down and free its GPU memory (best effort across vLLM versions)."""
        engine, self._engine, self._engine_kind = self._engine, None, None
        if engine is None:
            return
        core = getattr(getattr(engine, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del engine, core
        gc.collect()
        if self.api.cleanup is not None:
            self.api.cleanup()
