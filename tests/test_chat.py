"""Chat and prompt-response records (logitcache/chat.py): the rendered chat is exactly what the teacher
sees, targets sit exactly where the next token is an assistant's (every turn), one BOS, one clear line
for every bad record; every corpus format gives the same conversations."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import all_targets, build_cache
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from logitcache.chat import ChatRenderer, ChatStats, RecordFields, conversation, read_conversations, split_reference
from logitcache.cache.summary import summarize
from logitcache.cache.validate import validate_cache
from logitcache.corpus import Corpus
from logitcache.errors import LogitcacheError

# A small template in the usual shape: a role header per turn, an end-of-turn token after the assistant's.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
BOS = "<s>"

CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "Reverse: apple river"},
    {"role": "assistant", "content": "river apple"},
]


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    """The demo tokenizer with :data:`TEMPLATE` as its own chat template."""
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer(teacher_dir, tmp_path_factory) -> PreTrainedTokenizerFast:
    """The demo tokenizer made to add a BOS before every text (a post-processor, as Llama's tokenizers do)."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing

    backend = AutoTokenizer.from_pretrained(str(teacher_dir)).backend_tokenizer
    backend.add_special_tokens([AddedToken(BOS, special=True)])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token="<|endoftext|>", pad_token="<|pad|>")
    assert tok("a")["input_ids"][0] == bos_id  # the tokenizer really adds it
    return tok


def _runs(example) -> list[list[int]]:
    """The token ids at target positions' next tokens, as runs of consecutive positions."""
    runs, previous = [], None
    for t in np.flatnonzero(example.target_mask):
        if previous is None or t != previous + 1:
            runs.append([])
        runs[-1].append(int(example.input_ids[t + 1]))
        previous = t
    return runs


def test_multi_turn_targets_are_every_assistant_turn(tokenizer):
    example = ChatRenderer(tokenizer).example(CHAT, "record")
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert example.input_ids.dtype == np.int64 and example.target_mask.dtype == np.bool_
    assert len(example.target_mask) == len(example.input_ids) - 1
    assert example.input_ids.tolist() == tokenizer(text, add_special_tokens=False)["input_ids"]  # the rendering, nothing else
    runs = _runs(example)
    assert [tokenizer.decode(run) for run in runs] == ["5<|endoftext|>", "river apple<|endoftext|>"]


def test_chat_template_file_equals_the_tokenizers_own(teacher_dir, tokenizer, tmp_path):
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    plain = AutoTokenizer.from_pretrained(str(teacher_dir))
    assert plain.chat_template is None
    from_file = ChatRenderer(plain, RecordFields(), tmp_path / "chat.jinja").example(CHAT, "record")
    own = ChatRenderer(tokenizer).example(CHAT, "record")
    assert np.array_equal(from_file.input_ids, own.input_ids) and np.array_equal(from_file.target_mask, own.target_mask)
    with pytest.raises(LogitcacheError, match="no chat template; pass one as a Jinja file with --chat-template"):
        ChatRenderer(plain)
    with pytest.raises(LogitcacheError, match="--chat-template .*missing.jinja: cannot read it"):
        ChatRenderer(plain, RecordFields(), tmp_path / "missing.jinja")


@pytest.mark.parametrize("template_writes_bos", [True, False])
def test_one_bos_whether_the_template_writes_it_or_not(bos_tokenizer, template_writes_bos, tmp_path):
    template = ("{{ bos_token }}" if template_writes_bos else "") + TEMPLATE
    (tmp_path / "chat.jinja").write_text(template)
    renderer = ChatRenderer(bos_tokenizer, RecordFields(), tmp_path / "chat.jinja")
    ids = renderer.example(CHAT, "record").input_ids.tolist()
    prompt = renderer.prompt_ids(CHAT[:2], "record").tolist()
    bos = bos_tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert ids[: len(prompt)] == prompt  # the generation prompt is the start of the conversation


def test_a_token_merged_across_the_turn_boundary_is_a_target(tokenizer, tmp_path):
    """The assistant header ' th' and the answer 'e answer' tokenize as ' the' + ' answer': that token is a target."""
    (tmp_path / "tight.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% else %} th{{ m['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %} th{% endif %}"
    )
    renderer = ChatRenderer(tokenizer, RecordFields(), tmp_path / "tight.jinja")
    messages = [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": "e answer"}]
    example = renderer.example(messages, "record")
    start = len("Say it th")
    offsets = tokenizer("Say it the answer", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert any(b < start < e for b, e in offsets)  # the merge happens
    expected = [e > start for _, e in offsets[1:]] + [True]  # every token reaching into the answer, then EOS
    assert example.target_mask.tolist() == expected


def test_prompt_response_is_plain_text(tokenizer):
    fields = RecordFields(format="prompt-response", prompt_field="q", response_field="a")
    messages = conversation({"q": "2 + 3 =", "a": " 5"}, fields, "r")
    example = ChatRenderer(tokenizer, fields).example(messages, "r")
    assert example.input_ids.tolist() == tokenizer("2 + 3 = 5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(sum(_runs(example), [])) == " 5<|endoftext|>"
    with pytest.raises(LogitcacheError, match="--chat-template goes with --format chat"):
        ChatRenderer(tokenizer, fields, Path("chat.jinja"))


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize(("record", "message"), [
    ({"text": "hi"}, r"r.jsonl:1: no field 'messages' \(fields: text\); pick one with --messages-field"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "r.jsonl:1: message 0 has the unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
     "r.jsonl:1: message 1 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": 3}]}, "r.jsonl:1: the content of message 0 is int, not text"),
    ({"messages": []}, "r.jsonl:1: field 'messages' must be a non-empty list"),
    ({"messages": ["hi"]}, r"r.jsonl:1: message 0 is not a \{role, content\} object"),
])
def test_bad_records_are_one_clear_line(tmp_path, record, message):
    corpus = Corpus.open(_write_jsonl(tmp_path / "r.jsonl", [record]))
    with pytest.raises(LogitcacheError, match=message):
        list(read_conversations(corpus, RecordFields()))


def test_bad_prompt_response_records(tmp_path):
    fields = RecordFields(format="prompt-response")
    corpus = Corpus.open(_write_jsonl(tmp_path / "r.jsonl", [{"question": "hi"}]))
    with pytest.raises(LogitcacheError, match=r"no field 'prompt' \(fields: question\); pick one with --prompt-field"):
        list(read_conversations(corpus, fields))
    corpus = Corpus.open(_write_jsonl(tmp_path / "s.jsonl", [{"prompt": "hi", "response": ""}]))
    with pytest.raises(LogitcacheError, match="empty assistant turn"):
        list(read_conversations(corpus, fields))
    with pytest.raises(LogitcacheError, match="--format qa: use one of chat, prompt-response"):
        RecordFields(format="qa").check()


def test_templates_that_cannot_serve_are_named(tokenizer, tmp_path):
    (tmp_path / "raises.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(LogitcacheError, match="record: the chat template failed to render this record .*roles must alternate"):
        ChatRenderer(tokenizer, RecordFields(), tmp_path / "raises.jinja").example(CHAT, "record")
    # A template that renders the last turn differently: no prefix of the whole, so no turn can be found.
    (tmp_path / "last.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}")
    with pytest.raises(LogitcacheError, match="does not render turn by turn"):
        ChatRenderer(tokenizer, RecordFields(), tmp_path / "last.jinja").example(CHAT, "record")
    with pytest.raises(LogitcacheError, match="record: no assistant turn"):
        ChatRenderer(tokenizer).example(CHAT[:2], "record")


def test_max_len_truncates_or_skips_and_counts(tokenizer):
    renderer = ChatRenderer(tokenizer)
    full = renderer.example(CHAT, "r")
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    n = len(full.input_ids) - 3
    conversations = [("a", CHAT), ("b", short)]
    stats = ChatStats()
    kept = list(renderer.examples(iter(conversations), max_len=n, policy="truncate", stats=stats))
    assert np.array_equal(kept[0].input_ids, full.input_ids[:n]) and np.array_equal(kept[0].target_mask, full.target_mask[: n - 1])
    assert (stats.records, stats.examples, stats.truncated, stats.skipped) == (2, 2, 1, 0)
    assert stats.tokens == n + len(kept[1].input_ids)
    assert stats.target_positions == int(kept[0].target_mask.sum() + kept[1].target_mask.sum())
    stats = ChatStats()
    kept = list(renderer.examples(iter(conversations), max_len=n, policy="skip", stats=stats))
    assert len(kept) == 1 and (stats.examples, stats.truncated, stats.skipped) == (1, 0, 1)
    # Cut before the first answer: nothing left to learn, skipped even under truncate.
    stats = ChatStats()
    assert not list(renderer.examples(iter(conversations[:1]), max_len=8, policy="truncate", stats=stats))
    assert stats.skipped == 1
    with pytest.raises(LogitcacheError, match="length policy 'cut'"):
        list(renderer.examples(iter(conversations), policy="cut"))


def test_every_corpus_format_gives_the_same_conversations(tmp_path):
    import datasets

    records = [{"messages": CHAT, "id": 0}, {"messages": CHAT[1:3], "id": 1}]
    _write_jsonl(tmp_path / "c.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=1)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    expected = [CHAT, CHAT[1:3]]
    for path in ("c.jsonl", "c.parquet", "ds"):
        assert [m for _, m in read_conversations(Corpus.open(tmp_path / path), RecordFields())] == expected, path
    places = [where for where, _ in read_conversations(Corpus.open(tmp_path / "c.parquet"), RecordFields())]
    assert places == [f"{tmp_path / 'c.parquet'} row 0", f"{tmp_path / 'c.parquet'} row 1"]
    (tmp_path / "t.txt").write_text("plain")
    with pytest.raises(LogitcacheError, match="plain text holds no records"):
        list(read_conversations(Corpus.open(tmp_path / "t.txt"), RecordFields()))


def test_split_reference():
    assert split_reference(CHAT, "r") == (CHAT[:4], "river apple")
    assert split_reference(CHAT[:2], "r") == (CHAT[:2], None)
    with pytest.raises(LogitcacheError, match="r: a prompt must end with a user turn"):
        split_reference(CHAT[:1], "r")


# ---- chat corpora through the build -----------------------------------------------------------


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-corpus")
    (folder / "chat.jinja").write_text(TEMPLATE)
    records = [{"messages": CHAT}, {"messages": CHAT[1:3]}, {"messages": [{"role": "user", "content": "Hi"},
                                                                          {"role": "assistant", "content": "Hello there"}]}]
    (folder / "chats.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records * 4))
    return folder


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_a_chat_build_stores_targets_only_at_assistant_tokens(teacher_dir, chat_corpus, tmp_path, method):
    out = tmp_path / "cache"
    options = dict(method=method, k=4, samples=8, format="chat", chat_template=chat_corpus / "chat.jinja", seq_len=128,
                   packing="documents")
    manifest = build_cache(teacher_dir, chat_corpus / "chats.jsonl", out, **options)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    tok.chat_template = TEMPLATE
    renderer = ChatRenderer(tok, RecordFields())
    targets = all_targets(out)
    conversations = [c for _, c in read_conversations(Corpus.open(chat_corpus / "chats.jsonl"), RecordFields())]
    for row, messages in enumerate(conversations):
        want = renderer.example(messages, "record")
        n = targets.tokens()[row]
        assert targets.input_ids[row, :n].tolist() == want.input_ids.tolist()
        assert ((targets.target_lengths[row, : n - 1] > 0) == want.target_mask).all()  # every assistant token, no other
    assert manifest["layout"]["format"] == "chat" and manifest["corpus"]["examples"] == len(conversations)
    assert manifest["corpus"]["target_positions"] == int((targets.target_lengths > 0).sum())
    assert validate_cache(out) == []
    # no record was generated: the v3 column is there, NaN throughout, and minillm refuses the cache
    assert manifest["corpus"]["sampled"] == 0 and np.isnan(targets.behavior_logprob).all()
    from logitcache.train.settings import minillm_ready

    with pytest.raises(LogitcacheError, match="holds no generated response"):
        minillm_ready(manifest, "--cache C")
    # the same cache written as v2 (no behavior_logprob) converts back to it: the same targets, the column NaN
    from conftest import as_version

    from logitcache.cache.convert import convert_cache

    converted = convert_cache(as_version(out, tmp_path / "v2", 2), tmp_path / "v3")
    assert converted["format_version"] == 4 and validate_cache(tmp_path / "v3") == []
    again = all_targets(tmp_path / "v3")
    for name in ("input_ids", "target_lengths", "target_ids", "target_logprobs", "gold_logprob"):
        assert np.array_equal(getattr(again, name), getattr(targets, name)), name
    assert np.isnan(again.behavior_logprob).all()
    summary = summarize(out)
    assert summary["positions"] == manifest["totals"]["positions"] and math.isfinite(summary["teacher_perplexity"])
    if method == "topk":  # stored ids and covered mass are per position with targets, not per position
        assert summary["mean_ids_per_position"] == 4 and 0 < summary["mean_covered_mass"] <= 1
    from datasets import load_from_disk

    from logitcache.cache.export import export_cache

    export_cache(out, tmp_path / "axolotl", "axolotl")  # axolotl's CE must skip what the cache skips
    rows = {r["sequence_id"]: r for r in load_from_disk(str(tmp_path / "axolotl"))}
    for row, messages in enumerate(conversations):
        want = renderer.example(messages, "record")
        labels = np.asarray(rows[row]["labels"])
        assert (labels[1:] == -100).tolist() == (~want.target_mask).tolist()
        assert (labels[1:][want.target_mask] == want.input_ids[1:][want.target_mask]).all()


def test_sft_on_a_chat_corpus_counts_only_the_assistant_tokens(teacher_dir, chat_corpus, tmp_path):
    """``train --corpus --format chat --loss ce``: the SFT baseline, cross-entropy at the assistant's tokens only."""
    from logitcache.train.data import open_corpus
    from logitcache.train.distributed import World
    from logitcache.train.loop import run_train
    from logitcache.train.settings import TrainSettings

    settings = TrainSettings(out=tmp_path / "sft", corpus=chat_corpus / "chats.jsonl", tokenizer=teacher_dir, format="chat",
                             chat_template=chat_corpus / "chat.jinja", seq_len=128, student="nano", steps=2, batch_size=2,
                             eval_every=2, eval_windows=4, save_every=0, device="cpu")
    data = open_corpus(settings, step_windows=2, world=World(), lanes=1)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    tok.chat_template = TEMPLATE
    renderer = ChatRenderer(tok, RecordFields())
    conversations = [c for _, c in read_conversations(Corpus.open(chat_corpus / "chats.jsonl"), RecordFields())]
    held_out = [renderer.example(c, "record") for c in conversations[-4:]]
    got = np.concatenate([b["position_mask"].numpy() for b in data.eval_batches])
    for mask, example in zip(got, held_out):
        assert mask[: len(example.target_mask)].tolist() == example.target_mask.tolist() and not mask[len(example.target_mask):].any()
    prompts = tmp_path / "prompts.jsonl"  # --eval-prompts: each record ends in its reference answer
    prompts.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations[:3]))
    metrics = run_train(replace(settings, eval_prompts=prompts, eval_max_new_tokens=4))
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["eval_lm_loss"])
    assert 0 <= metrics["eval_task_exact_match"] <= 1 and 0 <= metrics["eval_task_rouge_l"] <= 1


def test_a_round_by_hand_student_samples_scored_by_the_teacher(teacher_dir, chat_corpus, topk_cache, tmp_path):
    """README's on-policy round: generate with the student, build a chat cache of its answers with the teacher,
    train the student from its own weights on it (here with GKD's JSD)."""
    from logitcache.generate.run import run_generate
    from logitcache.generate.settings import GenerateSettings
    from logitcache.train.loop import run_train
    from logitcache.train.settings import TrainSettings

    template = chat_corpus / "chat.jinja"
    prompts = tmp_path / "prompts.jsonl"
    # every other record ends in a reference answer, which generate leaves out of the prompt
    prompts.write_text("".join(json.dumps({"messages": CHAT[: 2 + 2 * (i % 2)]}) + "\n" for i in range(6)))
    generated = tmp_path / "round-0" / "generated.jsonl"
    run_generate(GenerateSettings(model=teacher_dir, prompts=prompts, out=generated, chat_template=template,
                                  max_new_tokens=6, temperature=1.0, seed=0, device="cpu"))
    cache = tmp_path / "round-0" / "cache"
    manifest = build_cache(teacher_dir, generated, cache, method="sample", samples=8, format="chat", chat_template=template,
                           seq_len=128, packing="documents")
    records = [json.loads(line) for line in generated.read_text().splitlines()]
    answers = [r["messages"][-1] for r in records]
    assert all(a["role"] == "assistant" for a in answers) and manifest["corpus"]["examples"] == len(answers)
    # the teacher scored the tokens the student drew, and each carries the log-probability it was drawn with
    assert manifest["corpus"]["sampled"] == len(records)
    stored = all_targets(cache)
    for row, record in enumerate(records):
        n, drawn = int(stored.tokens()[row]), np.asarray(record["response_ids"])
        assert np.array_equal(stored.input_ids[row, n - len(drawn) : n], drawn)
        behavior = stored.behavior_logprob[row, : n - 1]
        assert np.isnan(behavior[: n - 1 - len(drawn)]).all()
        np.testing.assert_allclose(behavior[n - 1 - len(drawn) :], record["response_logprobs"], rtol=2.0**-10, atol=1e-6)
        assert (stored.target_lengths[row, : n - 1] > 0).tolist() == np.isfinite(behavior).tolist()
    from logitcache.cache.export import export_cache  # kept for trainers outside logitcache, too
    import datasets

    export_cache(cache, tmp_path / "exported", "hf")
    exported = datasets.load_from_disk(str(tmp_path / "exported"))
    for row, record in enumerate(exported):
        n = int(stored.tokens()[row])
        np.testing.assert_array_equal(np.asarray(record["behavior_logprob"], dtype=np.float32), stored.behavior_logprob[row, : n - 1])
    from logitcache.teacher.folder import weights_fingerprint  # the round's cache names the student that answered

    import jsonschema
    from test_schemas import MANIFEST_SCHEMA, _undocumented

    jsonschema.validate(manifest, MANIFEST_SCHEMA)  # a chat cache's manifest keys are all published
    assert _undocumented(manifest) == []
    assert manifest["corpus"]["generated_by"] == {
        "model": str(teacher_dir.resolve()), "model_fingerprint": weights_fingerprint(teacher_dir), "temperature": 1.0,
        "top_p": 1.0, "seed": 0, "max_new_tokens": 6}
    metrics = run_train(TrainSettings(out=tmp_path / "round-0" / "student", cache=cache, loss="gkd-jsd", jsd_beta=0.5,
                                      init_from=teacher_dir, student=None, steps=2, batch_size=2, eval_every=2,
                                      eval_windows=2, save_every=0, device="cpu"))  # 6 rows: 2 held out, 4 trained on
    assert math.isfinite(metrics["loss"]) and (tmp_path / "round-0" / "student" / "student" / "config.json").is_file()
    # MiniLLM's policy gradient reads the sampling log-probabilities the cache keeps; a cache without them is refused
    pg = run_train(TrainSettings(out=tmp_path / "round-0" / "minillm", cache=cache, loss="minillm", pg_clip=0.2,
                                 init_from=teacher_dir, student=None, steps=2, batch_size=2, eval_every=2, eval_windows=2,
                                 save_every=0, device="cpu"))
    assert math.isfinite(pg["loss"])
    from logitcache.train.settings import minillm_ready

    for drawn_at in ({"temperature": 0.7}, {"top_p": 0.9}, {"temperature": 0.0}):  # log-probs not the student's own
        other = {**manifest, "corpus": {**manifest["corpus"], "generated_by": {**manifest["corpus"]["generated_by"], **drawn_at}}}
        with pytest.raises(LogitcacheError, match="not the student's own"):
            minillm_ready(other, "--cache C")
    with pytest.raises(LogitcacheError, match="minillm needs"):
        run_train(TrainSettings(out=tmp_path / "text-minillm", cache=topk_cache, loss="minillm", init_from=teacher_dir,
                                student=None, steps=1, device="cpu"))
