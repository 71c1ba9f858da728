"""The teacher on the architecture families users bring: tiny random-initialised models of 13 real
transformers classes (and Phi, HyperCLOVAX and MPT), each with its head transform set so that it bites
(Granite's ``logits_scaling`` that divides and HyperCLOVAX's that multiplies, Cohere's ``logit_scale``,
Gemma's ``final_logit_softcapping``, OPT's ``project_out``, Phi's head bias), compared with the
model's own ``model(ids).logits``, through the hf backend and vLLM's sample path; and a logit transform
logitcache does not know is still refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from test_teacher_vllm import assert_same_targets, fake_vllm  # noqa: F401 (a fixture)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from logitcache.demo import train_tokenizer
from logitcache.errors import LogitcacheError
from logitcache.targets.spec import TargetSpec
from logitcache.teacher.hf import HFTeacher
from logitcache.teacher.options import TeacherOptions
from logitcache.teacher.vllm import VLLMTeacher

TOKENIZER_IDS = 300  # fewer than the models' vocabulary: a padded head, as many real checkpoints have
VOCAB = 320
WINDOW = 24
K = 8
HEAD_GAIN = 20.0  # the head weight ×20: logits of a few units, so that the transforms and the top-k order matter

LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)

# class name → config class and keyword arguments (the transform each family declares, set where it has one)
ARCHITECTURES = {
    "LlamaForCausalLM": ("LlamaConfig", LLAMA_LIKE),
    "MistralForCausalLM": ("MistralConfig", LLAMA_LIKE),
    "Qwen2ForCausalLM": ("Qwen2Config", LLAMA_LIKE),
    "Qwen3ForCausalLM": ("Qwen3Config", {**LLAMA_LIKE, "head_dim": 8}),
    "Gemma2ForCausalLM": ("Gemma2Config", {**LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 2.0}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {**LLAMA_LIKE, "head_dim": 8, "final_logit_softcapping": 2.0}),
    "GraniteForCausalLM": ("GraniteConfig", {**LLAMA_LIKE, "logits_scaling": 4.0}),
    "CohereForCausalLM": ("CohereConfig", {**LLAMA_LIKE, "logit_scale": 0.3}),
    "Olmo2ForCausalLM": ("Olmo2Config", LLAMA_LIKE),
    "GPT2LMHeadModel": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4, n_positions=64)),
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)),
    "OPTForCausalLM": ("OPTConfig", dict(vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
                                         num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=64)),
    "FalconForCausalLM": ("FalconConfig", dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                               num_attention_heads=4, max_position_embeddings=64)),
    "PhiForCausalLM": ("PhiConfig", LLAMA_LIKE),  # a bias on the head
    "HyperCLOVAXForCausalLM": ("HyperCLOVAXConfig", {**LLAMA_LIKE, "logits_scaling": 4.0}),  # multiplies
    # MPT's config declares a logit_scale that its transformers class does not apply: a string is not a transform
    "MptForCausalLM": ("MptConfig", dict(vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=1, max_seq_len=64,
                                         logit_scale="inv_sqrt_d_model")),
}

TRANSFORMED = {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM", "CohereForCausalLM", "PhiForCausalLM",
               "HyperCLOVAXForCausalLM"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory, documents):
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(documents[:100], TOKENIZER_IDS, out)
    return out


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, TOKENIZER_IDS, (2, WINDOW), generator=torch.Generator().manual_seed(0))


def save_teacher(model: torch.nn.Module, tokenizer_dir, out):
    """Save ``model`` (head weight × :data:`HEAD_GAIN`, a random head bias where it has one) with the
    tokenizer; returns ``out``."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(HEAD_GAIN)
        if head.bias is not None:
            head.bias.copy_(torch.randn(head.bias.shape))
    model.eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def architecture(request, tmp_path_factory, tokenizer_dir, windows):
    """``(class name, folder, reference log-probs [2, WINDOW, VOCAB] float32)`` of a tiny model of one class."""
    config_name, kwargs = ARCHITECTURES[request.param]
    torch.manual_seed(0)
    model = getattr(transformers, request.param)(getattr(transformers, config_name)(**kwargs))
    folder = save_teacher(model, tokenizer_dir, tmp_path_factory.mktemp(request.param))
    with torch.no_grad():
        reference = torch.log_softmax(model(input_ids=windows).logits.float(), -1)
    return request.param, folder, reference


def test_chunked_head_gives_the_models_logits(architecture, windows):
    name, folder, reference = architecture
    teacher = HFTeacher(folder, device="cpu")
    assert type(teacher.model).__name__ == name  # the class under test, not a fallback
    with torch.inference_mode():
        ours = torch.log_softmax(teacher.head(teacher.hidden_states(windows).flatten(0, 1)), -1)
    torch.testing.assert_close(ours.reshape(reference.shape), reference, rtol=0, atol=1e-4)
    if name in TRANSFORMED:  # the transform bites: the bare head would be far off
        with torch.inference_mode():
            bare = torch.log_softmax(teacher.hidden_states(windows) @ teacher.head_weight.T, -1)  # no bias either
        assert (bare - reference).abs().max() > 0.5


def test_compute_passes_the_first_window_check_and_gives_the_reference_topk(architecture, windows):
    _, folder, reference = architecture
    teacher = HFTeacher(folder, device="cpu")
    got = teacher.compute(windows.numpy(), np.arange(len(windows)), TargetSpec("topk", k=K))
    assert teacher._verified
    want = reference[:, :-1].reshape(-1, VOCAB)
    top = torch.topk(want, K)
    ids = torch.from_numpy(got.target_ids.astype(np.int64)).reshape(-1, K)
    # the stored ids are the reference's top-k, in order (ids that tie within 1e-4 may swap)
    torch.testing.assert_close(want.gather(1, ids), top.values, rtol=0, atol=1e-4)
    assert (ids == top.indices).float().mean() > 0.99
    float16 = dict(rtol=2**-10, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(got.target_logprobs.astype(np.float32)).reshape(-1, K), top.values, **float16)
    gold = want.gather(1, windows[:, 1:].reshape(-1, 1))[:, 0]
    torch.testing.assert_close(torch.from_numpy(got.gold_logprob.astype(np.float32)).reshape(-1), gold, **float16)


def test_vllm_sample_path_applies_the_same_head(architecture, windows, fake_vllm):  # noqa: F811 (the fixture)
    """vLLM's sample path (an engine stand-in computing what vLLM returns from the model itself): the
    head weight read from the checkpoint and the same head transforms pass its check and give the hf targets."""
    _, folder, _ = architecture
    spec = TargetSpec("sample", samples=16)
    options = TeacherOptions("vllm", "cpu", "float32", None, WINDOW, spec, 1, 0.5, None)
    ids = np.arange(len(windows))
    got = VLLMTeacher(folder, options).compute(windows.numpy(), ids, spec)
    assert_same_targets(got, HFTeacher(folder, device="cpu").compute(windows.numpy(), ids, spec))


class TemperedLlamaConfig(LlamaConfig):
    model_type = "logitcache-tempered-llama"


class TemperedLlamaForCausalLM(LlamaForCausalLM):
    """A Llama whose logits are multiplied by a factor that no config field declares."""

    config_class = TemperedLlamaConfig

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.5
        return out


def test_a_logit_transform_logitcache_does_not_know_is_refused(tmp_path, tokenizer_dir, windows):
    AutoConfig.register(TemperedLlamaConfig.model_type, TemperedLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(TemperedLlamaConfig, TemperedLlamaForCausalLM, exist_ok=True)
    torch.manual_seed(0)
    folder = save_teacher(TemperedLlamaForCausalLM(TemperedLlamaConfig(**LLAMA_LIKE)), tokenizer_dir, tmp_path / "tempered")
    teacher = HFTeacher(folder, device="cpu")
    assert isinstance(teacher.model, TemperedLlamaForCausalLM)
    with pytest.raises(LogitcacheError, match="differs from the model's logits by"):
        teacher.compute(windows.numpy(), np.arange(len(windows)), TargetSpec("topk", k=K))
