"""The vllm backend gives the same shards as the hf backend.

vLLM is not needed: the objects it returns are mirrored below with its own attribute names and types
(each class names its vLLM file), filled from a real tiny Llama's log-softmax exactly as vLLM fills
them, and fed through the adapter. One GPU test runs the real engine when vLLM and CUDA are present.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import dataclass, field
from typing import TypedDict

import numpy as np
import pytest
import torch
from conftest import build_cache

from logitcache.build.run import run_build
from logitcache.build.settings import BuildSettings
from logitcache.cache.format import WindowTargets, read_shard
from logitcache.errors import LogitcacheError
from logitcache.targets.spec import TargetSpec
from logitcache.teacher import vllm as backend
from logitcache.teacher.folder import load_tokenizer
from logitcache.teacher.hf import HFTeacher

K = 8
SAMPLES = 16
WINDOWS = 4
N = 24


# --- Mirrors of vLLM's objects (vLLM 0.12.0 - 0.33.0) ----------------------------------------------


@dataclass
class FlatLogprobs:
    """vllm/logprobs.py ``FlatLogprobs``: entry i spans ``[start_indices[i], end_indices[i])`` of the flat lists."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """vllm/outputs.py ``CompletionOutput`` (the generated token; the adapter ignores it)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """vllm/outputs.py ``RequestOutput``: the attributes its ``__init__`` sets that matter here."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: FlatLogprobs | None
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class PoolingOutput:
    """vllm/outputs.py ``PoolingOutput``: ``data`` is ``[n_tokens, hidden]`` for ALL pooling."""

    data: torch.Tensor


@dataclass
class PoolingRequestOutput:
    """vllm/outputs.py ``PoolingRequestOutput``."""

    request_id: str
    outputs: PoolingOutput
    prompt_token_ids: list[int]
    num_cached_tokens: int
    finished: bool


class TokensPrompt(TypedDict):
    """vllm/inputs/data.py (0.12) / vllm/inputs/llm.py (0.33) ``TokensPrompt``."""

    prompt_token_ids: list[int]


@dataclass
class SamplingParams:
    """vllm/sampling_params.py ``SamplingParams``: the fields the adapter sets."""

    prompt_logprobs: int | None = None
    max_tokens: int | None = 16
    detokenize: bool = True
    flat_logprobs: bool = False


@dataclass
class PoolingParams:
    """vllm/pooling_params.py ``PoolingParams`` as of 0.20-0.33 (``normalize`` removed)."""

    use_activation: bool | None = None
    dimensions: int | None = None


@dataclass
class PoolerConfig:
    """vllm/config/pooler.py ``PoolerConfig`` as of 0.20-0.33."""

    pooling_type: str | None = None
    use_activation: bool | None = None


@dataclass
class PoolerConfigV012:
    """vllm/config/pooler.py ``PoolerConfig`` in 0.12 (``normalize`` for embeddings)."""

    pooling_type: str | None = None
    normalize: bool | None = None
    use_activation: bool | None = None


def flat_prompt_logprobs(tokens: list[int], logprobs: torch.Tensor, k: int) -> FlatLogprobs:
    """What vLLM hands back for one prompt, from ``logprobs [n, V]`` (row j: distribution after token j).

    As in vLLM: rows are scored against the next prompt token (v1/worker/gpu_model_runner.py),
    ``Sampler.gather_logprobs`` puts that token first, then ``torch.topk``, with rank = #(>= its value)
    (v1/sample/sampler.py), and ``create_prompt_logprobs`` + ``append_logprobs_for_next_position``
    add an empty entry 0 and never merge duplicates (logprobs.py).
    """
    rows, target = logprobs[:-1], torch.tensor(tokens[1:])
    top_logprobs, top_ids = torch.topk(rows, k, dim=-1)
    token_logprobs = rows.gather(1, target[:, None])
    ranks = (rows >= token_logprobs).sum(-1).tolist()
    ids = torch.cat([target[:, None], top_ids], 1).tolist()
    values = torch.cat([token_logprobs, top_logprobs], 1).tolist()
    flat = FlatLogprobs(start_indices=[0], end_indices=[0])
    for position in range(len(ids)):
        flat.start_indices.append(len(flat.logprobs))
        flat.token_ids += ids[position]
        flat.logprobs += values[position]
        flat.ranks += [ranks[position], *range(1, k + 1)]
        flat.decoded_tokens += [None] * (k + 1)
        flat.end_indices.append(len(flat.logprobs))
    return flat


class FakeLLM:
    """Stands in for ``vllm.LLM``: the tiny HF model (float32, CPU) computes what the engine returns."""

    started: list[FakeLLM] = []

    def __init__(self, **kwargs) -> None:
        from transformers import AutoModelForCausalLM

        self.kwargs = kwargs
        self.model = AutoModelForCausalLM.from_pretrained(kwargs["model"], dtype=torch.float32).eval()
        self.calls: list[tuple[str, int, object]] = []
        self.prompt_lengths: list[int] = []  # every prompt's tokens, in the order received
        FakeLLM.started.append(self)

    @torch.inference_mode()
    def generate(
        self, prompts: list[TokensPrompt], sampling_params: SamplingParams, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        assert self.kwargs.get("runner") != "pooling"
        assert sampling_params.prompt_logprobs <= self.kwargs["max_logprobs"]
        self.calls.append(("generate", len(prompts), sampling_params))
        self.prompt_lengths += [len(p["prompt_token_ids"]) for p in prompts]
        # each prompt alone, as the engine computes every sequence (of any length) on its own
        logprobs = [torch.log_softmax(self.model(input_ids=torch.tensor([p["prompt_token_ids"]])).logits[0].float(), dim=-1)
                    for p in prompts]
        k = sampling_params.prompt_logprobs
        generated = [CompletionOutput(0, "", [0], None, None, "length")]
        return [
            RequestOutput(str(i), None, tokens, flat_prompt_logprobs(tokens, lp, k), generated, True)
            for i, (tokens, lp) in enumerate(zip((p["prompt_token_ids"] for p in prompts), logprobs))
        ]

    @torch.inference_mode()
    def encode(self, prompts: list[TokensPrompt], pooling_params: PoolingParams | None = None, *,
               pooling_task: str | None = None, use_tqdm: bool = True) -> list[PoolingRequestOutput]:
        assert self.kwargs["runner"] == "pooling" and pooling_task == "token_embed"
        self.calls.append(("encode", len(prompts), pooling_params))
        self.prompt_lengths += [len(p["prompt_token_ids"]) for p in prompts]
        hidden = [self.model.get_decoder()(input_ids=torch.tensor([p["prompt_token_ids"]])).last_hidden_state[0].float()
                  for p in prompts]
        return [PoolingRequestOutput(str(i), PoolingOutput(h.clone()), p["prompt_token_ids"], 0, True)
                for i, (p, h) in enumerate(zip(prompts, hidden))]


@pytest.fixture
def fake_vllm(monkeypatch) -> type[FakeLLM]:
    api = backend.VLLMApi("0.33.0", FakeLLM, SamplingParams, TokensPrompt, PoolingParams, PoolerConfig)
    monkeypatch.setattr(backend, "import_vllm", lambda: api)
    FakeLLM.started = []
    return FakeLLM


# --- Data -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_teacher(teacher_dir) -> HFTeacher:
    return HFTeacher(teacher_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def windows(hf_teacher, documents) -> np.ndarray:
    """``[WINDOWS, N]`` token windows of real text; the last one continues greedily, so its actual next
    tokens are the teacher's top-1 (vLLM's 'prompt token inside the top-k' case)."""
    tokens = load_tokenizer(hf_teacher.path)(" ".join(documents[:40]))["input_ids"]
    out = np.array(tokens[: WINDOWS * N], dtype=np.int64).reshape(WINDOWS, N)
    with torch.inference_mode():
        for t in range(N // 2, N):
            logits = hf_teacher.model(input_ids=torch.from_numpy(out[-1:, :t])).logits
            out[-1, t] = int(logits[0, -1].argmax())
    return out


def settings_for(teacher_dir, corpus_file, tmp_path, **overrides) -> BuildSettings:
    values = dict(teacher=teacher_dir, corpus=corpus_file, out=tmp_path / "out", backend="vllm", device="cpu",
                  dtype="float32", k=K, samples=SAMPLES, seq_len=N)
    return BuildSettings(**{**values, **overrides})


def assert_same_targets(got: WindowTargets, want: WindowTargets) -> None:
    """Identical ids, lengths and counts; log-probabilities equal at float16 precision."""
    for name in ("sequence_ids", "input_ids", "target_lengths", "target_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
        assert getattr(got, name).dtype == getattr(want, name).dtype, name
    for name in ("target_logprobs", "gold_logprob", "tail_logprob", "target_counts"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype, name
            np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=name)


# --- The conversion ------------------------------------------------------------------------------


def test_flat_prompt_logprobs_give_the_hf_topk_targets(hf_teacher, windows):
    ids = np.arange(10, 10 + WINDOWS, dtype=np.int64)
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf_teacher.model(input_ids=torch.from_numpy(windows)).logits.float(), dim=-1)
    outputs = [RequestOutput(str(i), None, w.tolist(), flat_prompt_logprobs(w.tolist(), lp, K), [], True)
               for i, (w, lp) in enumerate(zip(windows, logprobs))]
    ranks = np.array([o.prompt_logprobs.ranks[:: K + 1] for o in outputs])
    assert (ranks <= K).any() and (ranks > K).any(), "both layouts of the prompt token (in and outside the top-k)"

    got = backend.topk_window_targets(outputs, windows, ids, K)
    assert_same_targets(got, hf_teacher.compute(windows, ids, TargetSpec("topk", k=K)))


def test_unexpected_layouts_are_refused(hf_teacher, windows):
    tokens = windows[0].tolist()
    with torch.inference_mode():
        logprobs = torch.log_softmax(hf_teacher.model(input_ids=torch.from_numpy(windows[:1])).logits[0].float(), dim=-1)
    good = flat_prompt_logprobs(tokens, logprobs, K)
    backend.prompt_topk(tokens, good, K)
    with pytest.raises(LogitcacheError, match="unexpected layout"):
        backend.prompt_topk(tokens, good, K - 1)
    with pytest.raises(LogitcacheError, match="unexpected layout"):
        backend.prompt_topk(tokens, [None] + [{} for _ in tokens[1:]], K)  # the list-of-dicts layout
    with pytest.raises(LogitcacheError, match="not aligned"):
        backend.prompt_topk([tokens[0], *tokens[2:], tokens[1]], good, K)


def test_tail_is_derived_in_float64_with_a_floor():
    tails = backend.tail_logprob(np.log(np.array([[0.5, 0.25], [0.5, 0.5], [0.75, 0.25 + 1e-9]], dtype=np.float32)))
    np.testing.assert_allclose(tails, [np.log(0.25), np.log(backend.TAIL_FLOOR), np.log(backend.TAIL_FLOOR)])


# --- The teacher, on a stand-in engine -------------------------------------------------------------


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_vllm_teacher_equals_hf_teacher(fake_vllm, hf_teacher, windows, teacher_dir, corpus_file, tmp_path, method):
    settings = settings_for(teacher_dir, corpus_file, tmp_path, method=method)
    spec = settings.spec
    ids = np.arange(WINDOWS, dtype=np.int64) + 100
    teacher = backend.VLLMTeacher(teacher_dir, settings.teacher_options())
    assert teacher.vocab_size == hf_teacher.vocab_size
    assert teacher.describe()["vllm_version"] == "0.33.0"

    assert_same_targets(teacher.compute(windows, ids, spec), hf_teacher.compute(windows, ids, spec))

    first = fake_vllm.started[0]
    assert first.kwargs["enable_prefix_caching"] is False and first.kwargs["logprobs_mode"] == "raw_logprobs"
    assert first.kwargs["max_logprobs"] >= K and first.kwargs["max_model_len"] == N + 1
    assert first.kwargs["max_num_batched_tokens"] == backend.tokens_per_step(teacher.vocab_size, backend.DEFAULT_CHUNK_MIB)
    params = first.calls[0][2]
    assert (params.max_tokens, params.detokenize, params.flat_logprobs) == (1, False, True)
    if method == "topk":
        assert len(fake_vllm.started) == 1 and params.prompt_logprobs == K
    else:  # a generate engine checks the head on a few windows, then the pooling engine serves every batch
        assert [llm.kwargs.get("runner") for llm in fake_vllm.started] == [None, "pooling"]
        assert first.kwargs["enforce_eager"] and first.calls[0][1] == backend.CHECK_WINDOWS
        pooling = fake_vllm.started[1].kwargs
        assert pooling["convert"] == "embed" and pooling["pooler_config"] == PoolerConfig("ALL", use_activation=False)
        assert fake_vllm.started[1].calls[-1][2] == PoolingParams(use_activation=False)


def test_a_vllm_build_writes_the_hf_builds_shards(fake_vllm, teacher_dir, corpus_file, topk_cache, tmp_path):
    """Through run_build (async host threads and all): same windows and targets as hf; the backend is part
    of the build's identity (real engines differ in numerics and in the tail), so the fingerprint is not."""
    manifest = build_cache(teacher_dir, corpus_file, tmp_path / "vllm", method="topk", k=8, backend="vllm",
                           device="cpu", dtype="float32")
    want = json.loads((topk_cache / "manifest.json").read_text())
    assert manifest["fingerprint"] != want["fingerprint"] and manifest["teacher"]["backend"] == "vllm"
    assert [s["rows"] for s in manifest["shards"]] == [s["rows"] for s in want["shards"]]
    for shard in want["shards"]:
        assert_same_targets(read_shard(tmp_path / "vllm" / shard["file"]), read_shard(topk_cache / shard["file"]))


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_rows_of_different_lengths_are_prompts_of_their_own(fake_vllm, hf_teacher, windows, teacher_dir, corpus_file,
                                                           tmp_path, method):
    """Right-padded rows (``packing documents``) reach vLLM without their padding and give the hf backend's targets."""
    settings = settings_for(teacher_dir, corpus_file, tmp_path, method=method)
    counts = np.array([N, 7, 15, 3])
    batch = np.where(np.arange(N) < counts[:, None], windows, 0)
    ids = np.arange(WINDOWS, dtype=np.int64)
    got = backend.VLLMTeacher(teacher_dir, settings.teacher_options()).compute(batch, ids, settings.spec, counts)
    served = fake_vllm.started[-1].prompt_lengths  # the engine that served the batch (sample: after the head check's)
    assert served[-WINDOWS:] == counts.tolist()
    assert_same_targets(got, hf_teacher.compute(batch, ids, settings.spec, counts))
    assert np.array_equal(got.tokens(), counts)


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}")


@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize("corpus_format", ["text", "chat"])
def test_a_vllm_documents_build_writes_the_hf_builds_shards(fake_vllm, teacher_dir, corpus_file, tmp_path, method,
                                                            corpus_format):
    """Both backends apply the same layout (a row per document; a chat's targets only at its assistant tokens):
    the same rows, batched and written the same way."""
    options = dict(method=method, k=K, samples=SAMPLES, packing="documents", device="cpu", dtype="float32")
    corpus = corpus_file
    if corpus_format == "chat":
        (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
        corpus = tmp_path / "chats.jsonl"
        turns = [{"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"},
                 {"role": "user", "content": "Reverse: a b"}, {"role": "assistant", "content": "b a"}]
        corpus.write_text("".join(json.dumps({"messages": turns[: 2 + 2 * (i % 2)]}) + "\n" for i in range(10)))
        options.update(format="chat", chat_template=tmp_path / "chat.jinja")
    hf = build_cache(teacher_dir, corpus, tmp_path / "hf", **options)
    vllm = build_cache(teacher_dir, corpus, tmp_path / "vllm", backend="vllm", **options)
    assert [s["rows"] for s in vllm["shards"]] == [s["rows"] for s in hf["shards"]] and vllm["layout"] == hf["layout"]
    for shard in hf["shards"]:
        assert_same_targets(read_shard(tmp_path / "vllm" / shard["file"]), read_shard(tmp_path / "hf" / shard["file"]))


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_batches_are_split_into_bounded_calls(
    fake_vllm, hf_teacher, windows, teacher_dir, corpus_file, tmp_path, monkeypatch, method
):
    settings = settings_for(teacher_dir, corpus_file, tmp_path, method=method)
    ids = np.arange(WINDOWS, dtype=np.int64)
    whole = backend.VLLMTeacher(teacher_dir, settings.teacher_options()).compute(windows, ids, settings.spec)
    per_token = (K + 1) * backend.PROMPT_VALUE_BYTES if method == "topk" else hf_teacher.config.hidden_size * 4
    monkeypatch.setattr(backend, "HOST_BYTES_PER_CALL", 3 * N * per_token)
    split_teacher = backend.VLLMTeacher(teacher_dir, settings.teacher_options())
    split = split_teacher.compute(windows, ids, settings.spec)
    assert [n for _, n, _ in fake_vllm.started[-1].calls][-2:] == [3, 1]
    assert_same_targets(split, whole)


def test_a_head_that_disagrees_with_vllm_is_refused(fake_vllm, windows, teacher_dir, corpus_file, tmp_path):
    settings = settings_for(teacher_dir, corpus_file, tmp_path, method="sample")
    teacher = backend.VLLMTeacher(teacher_dir, settings.teacher_options())
    teacher.config.logit_scale = 2.0  # a scaling the engine does not apply: the check must notice
    with pytest.raises(LogitcacheError, match="differs from vLLM's own prompt log-probabilities"):
        teacher.compute(windows, np.arange(WINDOWS), settings.spec)


def test_head_weight_is_read_from_the_checkpoint(hf_teacher, teacher_dir, tmp_path):
    config = backend.load_text_config(teacher_dir)
    weight, bias = backend.load_head(teacher_dir, config)
    torch.testing.assert_close(weight, hf_teacher.head_weight.detach(), rtol=0, atol=0)
    assert bias is None

    from transformers import LlamaForCausalLM

    tied_config = config.__class__(**{**config.to_dict(), "tie_word_embeddings": True})
    tied = LlamaForCausalLM(tied_config)
    tied.save_pretrained(tmp_path / "tied")
    assert backend.head_names(tied_config) == (["model.embed_tokens.weight", "lm_head.weight", "embed_tokens.weight"], [])
    torch.testing.assert_close(backend.load_head(tmp_path / "tied", tied_config)[0],
                               tied.get_input_embeddings().weight.detach(), rtol=0, atol=0)
    tied.model.save_pretrained(tmp_path / "base")  # saved from the base model: no "model." prefix, as GPT-2 on the Hub
    torch.testing.assert_close(backend.load_head(tmp_path / "base", tied_config)[0],
                               tied.get_input_embeddings().weight.detach(), rtol=0, atol=0)


# --- Versions, installs, bounds --------------------------------------------------------------------


@pytest.mark.parametrize(("version", "ok"), [("0.11.1", False), ("0.12.0", True), ("0.20.1+cu129", True),
                                             ("0.33.0", True), ("0.34.0", False), ("1.0.0", False)])
def test_supported_vllm_versions(version, ok):
    if ok:
        backend.check_vllm_version(version)
    else:
        with pytest.raises(LogitcacheError, match="not supported"):
            backend.check_vllm_version(version)


def test_missing_vllm_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(LogitcacheError, match=r"pip install 'logitcache\[vllm\]' on a GPU machine"):
        backend.import_vllm()


def test_normalisation_is_switched_off_in_each_versions_spelling():
    class MsgspecPoolingParamsV012:  # msgspec.Struct lists its fields in __struct_fields__
        __struct_fields__ = ("truncate_prompt_tokens", "dimensions", "normalize", "use_activation")

    assert backend.without_normalisation(PoolerConfigV012, MsgspecPoolingParamsV012, PoolerConfig, PoolingParams) == [
        {"normalize": False}, {"normalize": False}, {"use_activation": False}, {"use_activation": False}]


def test_memory_bounds():
    assert backend.tokens_per_step(152_064, 2048) == (2048 << 20) // (152_064 * 12)
    assert backend.tokens_per_step(10**7, 1) == backend.MIN_TOKENS_PER_STEP
    assert backend.tokens_per_step(1000, 10**6) == backend.MAX_TOKENS_PER_STEP
    assert backend.windows_per_call(4096, 33 * 128, budget=1 << 30) == 62  # 1 GiB / 17.3 MB
    assert backend.windows_per_call(10**6, 10**6, budget=1) == 1


# --- The real engine ------------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_vllm_build_matches_hf(teacher_dir, corpus_file, windows, tmp_path):
    pytest.importorskip("vllm")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    common = dict(teacher=teacher_dir, corpus=corpus_file, method="topk", k=K, seq_len=N, batch_size=64,
                  shard_size=64, dtype="float32")
    run_build(BuildSettings(out=tmp_path / "hf", backend="hf", device="cuda", **common))
    run_build(BuildSettings(out=tmp_path / "vllm", backend="vllm", gpu_memory_utilization=0.25, **common))
    gc.collect()  # the build's engine is unreachable now: let it shut down before the next one starts
    got, want = read_shard(tmp_path / "vllm" / "shard-00000.parquet"), read_shard(tmp_path / "hf" / "shard-00000.parquet")
    np.testing.assert_array_equal(got.input_ids, want.input_ids)
    assert np.mean(got.target_ids == want.target_ids) > 0.95
    for name in ("gold_logprob", "tail_logprob"):
        np.testing.assert_allclose(getattr(got, name).astype(np.float32), getattr(want, name).astype(np.float32), atol=2e-2)
    values = lambda t: np.sort(t.target_logprobs.astype(np.float32).reshape(-1, K), axis=1)  # noqa: E731
    np.testing.assert_allclose(values(got), values(want), atol=2e-2)

    settings = BuildSettings(out=tmp_path / "s", backend="vllm", **{**common, "method": "sample", "samples": SAMPLES},
                             gpu_memory_utilization=0.25)
    teacher = backend.VLLMTeacher(teacher_dir, settings.teacher_options())
    try:
        sampled = teacher.compute(windows, np.arange(WINDOWS), settings.spec)  # runs the head check first
    finally:
        teacher.close()
    counts = np.add.reduceat(sampled.target_counts.astype(np.int64), np.r_[0, np.cumsum(sampled.target_lengths)[:-1]])
    assert (counts == SAMPLES).all()
