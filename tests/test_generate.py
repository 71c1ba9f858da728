"""Generation and task evaluation (logitcache/generate/, examples/tasks.py): the task set is checkable and
disjoint; draws follow the sampling distribution and their stored log-probabilities are its own; a seed
fixes the responses whatever the batch size; an interrupted file resumes to the same records; the output
reads back as a chat corpus; a model scores exact match 1 on its own greedy answers."""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from test_chat import TEMPLATE
from transformers import AutoModelForCausalLM, AutoTokenizer

from logitcache.chat import ChatRenderer, RecordFields, read_conversations
from logitcache.corpus import Corpus
from logitcache.errors import LogitcacheError
from logitcache.generate.decode import pick_tokens
from logitcache.generate.run import run_generate, settings_path
from logitcache.generate.settings import EvaluateSettings, GenerateSettings, Sampling
from logitcache.generate.tasks import normalise, run_evaluate, score_answers
from logitcache.targets.rng import row_keys

REPO = Path(__file__).resolve().parents[1]
MAX_NEW = 6


def _load_tasks():
    spec = importlib.util.spec_from_file_location("example_tasks", REPO / "examples" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tasks = _load_tasks()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Ten held-out task prompts with their reference answers, as chat records."""
    _, held_out = tasks.make_tasks(seed=0, train=0, held_out=10)
    path = tmp_path_factory.mktemp("prompts") / "held_out.jsonl"
    tasks.write_records(path, held_out)
    return path


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="module")
def settings(teacher_dir, prompts, template, tmp_path_factory) -> GenerateSettings:
    """Sampled generation (temperature 1, top-p 0.9) of the demo teacher, the batch size not dividing the prompts."""
    out = tmp_path_factory.mktemp("generated") / "out.jsonl"
    return GenerateSettings(model=teacher_dir, prompts=prompts, out=out, chat_template=template, temperature=1.0,
                            top_p=0.9, max_new_tokens=MAX_NEW, seed=7, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def generated(settings) -> Path:
    run_generate(settings)
    return settings.out


# ---- the task set -----------------------------------------------------------------------------


def _answer(kind: str, prompt: str) -> str:
    """The answer to a task prompt, worked out from the prompt alone."""
    tail = prompt.split(": ", 1)[-1]
    if kind == "add":
        a, b = map(int, re.findall(r"\d+", prompt))
        return str(a + b)
    if kind == "reverse":
        return " ".join(reversed(tail.split()))
    if kind == "sort":
        return " ".join(map(str, sorted(map(int, tail.split()))))
    if kind == "upper":
        return tail.upper()
    letter, letters = re.fullmatch(r"How many times does the letter (\w) occur in (\w+)\? .*", prompt).groups()
    return str(letters.count(letter))


def test_task_set_is_checkable_deterministic_and_held_out(tmp_path):
    train, held_out = tasks.make_tasks(seed=0, train=300, held_out=60)
    assert (train, held_out) == tasks.make_tasks(seed=0, train=300, held_out=60)
    assert tasks.make_tasks(seed=1, train=300, held_out=60) != (train, held_out)
    assert tasks.make_tasks(seed=0, train=5, held_out=60)[1] == held_out  # the held-out set whatever the train size
    prompts = [{r["messages"][0]["content"] for r in records} for records in (train, held_out)]
    assert len(prompts[0]) == 300 and len(prompts[1]) == 60 and not prompts[0] & prompts[1]
    for record in train + held_out:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == _answer(record["kind"], user["content"])
    assert [r["kind"] for r in held_out[:5]] == list(tasks.TASKS)
    assert sorted({r["kind"] for r in train}) == sorted(tasks.TASKS)
    tasks.write_records(tmp_path / "t.jsonl", held_out)
    read = [m for _, m in read_conversations(Corpus.open(tmp_path / "t.jsonl"), RecordFields())]
    assert read == [r["messages"] for r in held_out]


# ---- sampling ---------------------------------------------------------------------------------


def test_draws_follow_the_nucleus_and_report_its_logprobs():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05], dtype=torch.float64)
    n = 20000
    logits = probs.log().float().expand(n, -1)
    keys = row_keys(3, torch.arange(n), torch.zeros(n, dtype=torch.int64))
    for top_p, kept in ((1.0, 5), (0.8, 3)):  # 0.8: the tokens whose more likely ones hold less than 0.8
        nucleus = torch.cat([probs[:kept], torch.zeros(5 - kept, dtype=torch.float64)])
        nucleus /= nucleus.sum()
        ids, logprobs = pick_tokens(logits, Sampling(temperature=1.0, top_p=top_p), keys)
        freq = torch.bincount(ids, minlength=5).double() / n
        assert torch.allclose(freq, nucleus, atol=0.012), (top_p, freq)
        assert torch.allclose(logprobs.double(), nucleus.log()[ids], atol=1e-5)
    ids, logprobs = pick_tokens(logits[:3], Sampling(temperature=0.0), keys[:3])
    assert ids.tolist() == [0, 0, 0] and logprobs.tolist() == [0.0, 0.0, 0.0]
    ids, _ = pick_tokens(logits, Sampling(temperature=0.05), keys)  # a low temperature is nearly greedy
    assert (ids == 0).float().mean() > 0.99


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _assert_same_responses(records: list[dict], expected: list[dict]) -> None:
    """The same tokens and texts; log-probabilities equal up to float rounding (differently padded batches
    differ in the last bits of the logits, no more)."""
    for name in ("index", "messages", "response_ids", "finished"):
        assert [r[name] for r in records] == [r[name] for r in expected], name
    assert np.allclose([r["response_logprobs"] for r in records], [r["response_logprobs"] for r in expected], atol=1e-5)


def test_a_seed_fixes_the_responses_whatever_the_batch_size(settings, generated, tmp_path):
    one_by_one = replace(settings, out=tmp_path / "one.jsonl", batch_size=1)
    run_generate(one_by_one)
    _assert_same_responses(_records(one_by_one.out), _records(generated))
    again = replace(settings, out=tmp_path / "again.jsonl")
    run_generate(again)
    assert again.out.read_bytes() == generated.read_bytes()  # the same settings: the same bytes
    other_seed = replace(settings, out=tmp_path / "seed.jsonl", seed=8)
    run_generate(other_seed)
    assert [r["response_ids"] for r in _records(other_seed.out)] != [r["response_ids"] for r in _records(generated)]


def test_records_hold_the_prompt_response_and_the_sampling_logprobs(settings, generated, teacher_dir, template):
    records = _records(generated)
    held_out = _records(settings.prompts)
    assert [r["index"] for r in records] == list(range(len(held_out)))  # no empty response with this seed
    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    renderer = ChatRenderer(tokenizer, RecordFields(), template)
    for record in records[:3]:
        prompt = held_out[record["index"]]["messages"][:-1]
        assert record["messages"][:-1] == prompt and record["messages"][-1]["role"] == "assistant"
        ids = record["response_ids"]
        assert len(ids) == len(record["response_logprobs"]) <= MAX_NEW
        assert record["finished"] == (ids[-1] == tokenizer.eos_token_id)
        shown = ids[:-1] if record["finished"] else ids
        assert record["messages"][-1]["content"] == tokenizer.decode(shown, skip_special_tokens=True)
        # The stored log-probability of each token is the one under softmax(logits) cut to its 0.9 nucleus.
        prompt_ids = renderer.prompt_ids(prompt, "r").tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1]
        probs, order = torch.softmax(logits.double(), -1).sort(-1, descending=True)
        nucleus = torch.where(probs.cumsum(-1) - probs < 0.9, probs, 0.0)
        rank = (order == torch.tensor(ids)[:, None]).double().argmax(-1)
        expected = (nucleus.gather(-1, rank[:, None])[:, 0] / nucleus.sum(-1)).log()
        assert np.allclose(record["response_logprobs"], expected.numpy(), atol=1e-4)


def test_an_interrupted_file_resumes_to_the_same_records(settings, generated, tmp_path):
    full = generated.read_bytes()
    lines = full.splitlines(keepends=True)
    out = tmp_path / "resumed.jsonl"
    out.write_bytes(b"".join(lines[:5]) + lines[5][:20])  # five whole records and a torn sixth
    resumed = replace(settings, out=out, batch_size=3)
    settings_path(out).write_text(settings_path(generated).read_text())
    counts = run_generate(resumed)
    assert counts["resumed_at"] == 5 and counts["written"] == len(lines) - 5
    _assert_same_responses(_records(out), _records(generated))
    with pytest.raises(LogitcacheError, match=r"was generated with other settings \(seed\)"):
        run_generate(replace(resumed, seed=1))
    too_long = replace(settings, out=tmp_path / "long.jsonl", max_new_tokens=200)
    with pytest.raises(LogitcacheError, match=r"held_out.jsonl:1: the prompt is \d+ tokens; with --max-new-tokens 200 that "
                                              "passes the model's context of 128 tokens"):
        run_generate(too_long)
    assert not too_long.out.exists() and not settings_path(too_long.out).exists()  # nothing half-written
    (tmp_path / "foreign.jsonl").write_text("{}\n")
    with pytest.raises(LogitcacheError, match="exists and was not written by `logitcache generate`"):
        run_generate(replace(settings, out=tmp_path / "foreign.jsonl"))


def test_the_output_reads_back_as_a_chat_corpus(generated, teacher_dir, template):
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    renderer = ChatRenderer(tokenizer, RecordFields(), template)
    conversations = list(read_conversations(Corpus.open(generated), RecordFields()))
    examples = list(renderer.examples(iter(conversations)))
    assert len(examples) == len(_records(generated))
    for (_, messages), example in zip(conversations, examples):
        answer = example.input_ids[1:][example.target_mask]
        assert tokenizer.decode(answer).startswith(messages[-1]["content"])


def test_prompt_records_give_prompt_response_records(settings, tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"q": q}) + "\n" for q in ("Hello", "The sum of 2 and 3 is")))
    plain = replace(settings, prompts=tmp_path / "p.jsonl", out=tmp_path / "r.jsonl", format="prompt-response",
                    prompt_field="q", response_field="a", chat_template=None)
    run_generate(plain)
    records = _records(plain.out)
    assert [r["q"] for r in records] == ["Hello", "The sum of 2 and 3 is"] and all(r["a"].strip() for r in records)
    read = list(read_conversations(Corpus.open(plain.out), plain.fields))
    assert [m[1]["content"] for _, m in read] == [r["a"] for r in records]


# ---- evaluation -------------------------------------------------------------------------------


def test_scores():
    assert normalise("  river \n apple ") == "river apple"
    scores = score_answers(["river  apple", "RIVER APPLE", "apple river stone"], ["river apple"] * 3)
    assert scores["exact_match"] == pytest.approx(1 / 3)  # case is kept: the upper task is about it
    # ROUGE-L F1: 1, 1 (rouge-score lower-cases), and LCS 1 of 3 and 2 words -> 2 * (1/3 * 1/2) / (1/3 + 1/2) = 0.4
    assert scores["rouge_l"] == pytest.approx((1 + 1 + 0.4) / 3)


def test_a_model_matches_its_own_greedy_answers(settings, teacher_dir, template, tmp_path):
    greedy = replace(settings, out=tmp_path / "greedy.jsonl", temperature=0.0)
    run_generate(greedy)
    assert all(p == 0.0 for r in _records(greedy.out) for p in r["response_logprobs"])
    evaluation = EvaluateSettings(model=teacher_dir, prompts=greedy.out, chat_template=template, max_new_tokens=MAX_NEW,
                                  batch_size=4, device="cpu")
    scores = run_evaluate(evaluation)
    assert scores["prompts"] == len(_records(greedy.out)) and scores["exact_match"] == 1.0
    references = run_evaluate(replace(evaluation, prompts=settings.prompts))  # a random model: not the task's answers
    assert references["prompts"] == 10 and references["exact_match"] < 1.0
    with pytest.raises(LogitcacheError, match="no reference answer"):
        run_evaluate(replace(evaluation, prompts=_prompts_only(tmp_path)))


def _prompts_only(tmp_path: Path) -> Path:
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    return path


def test_cli_generate_and_evaluate(teacher_dir, prompts, template, tmp_path):
    out = tmp_path / "cli.jsonl"
    bad = run_cli("generate", "--model", str(teacher_dir), "--prompts", str(prompts), "--out", str(out), "--top-p", "0")
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --top-p 0.0: must be in (0, 1]"
    assert not out.exists() and not settings_path(out).exists()
    ok = run_cli("evaluate", "--model", str(teacher_dir), "--prompts", str(prompts), "--chat-template", str(template),
                 "--max-new-tokens", "4", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"exact_match\s+\d", ok.stdout) and re.search(r"rouge_l\s+\d", ok.stdout) and "prompts" in ok.stdout
