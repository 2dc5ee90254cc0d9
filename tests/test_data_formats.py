"""Formatted data: which tokens carry loss, cutting to data.max_length, padding, bad keys."""
import random

import pytest
import torch

from tiny import EOS, write_jsonl
from tunebench import data
from tunebench.errors import UserError
from tunebench.metrics import causal_nll
from tunebench.models import load_model, load_tokenizer
from tunebench.recipe import ModelSettings, load_recipe

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Response:\n"
)
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n"
)


@pytest.fixture(scope="module")
def tokenizer(assets):
    return load_tokenizer(ModelSettings(name=str(assets / "gpt2")))


def data_cfg(dataset, *overrides):
    return load_recipe(None, ["name=t", "model.name=m", f"data.dataset={dataset}", *overrides]).data


def split(example):
    """(prompt side ids, scored ids) of an example; asserts the scored ids are one tail."""
    ids, labels = list(map(int, example["input_ids"])), list(map(int, example["labels"]))
    first = next(i for i, label in enumerate(labels) if label != -100)
    assert all(label == -100 for label in labels[:first])
    assert labels[first:] == ids[first:]
    return ids[:first], ids[first:]


def alpaca_rows(n=24, seed=0):
    rng = random.Random(seed)
    words = "river stone light quiet number letter answer garden small bright".split()
    return [
        {
            "instruction": f"Write {i} words about {rng.choice(words)}.",
            "input": "" if i % 3 else " ".join(rng.choices(words, k=4)),
            "output": " ".join(rng.choices(words, k=3 + i % 7)) + ".",
        }
        for i in range(n)
    ]


def test_instruction_loss_is_on_the_response_and_end_of_text_only(tmp_path, tokenizer):
    rows = alpaca_rows()
    write_jsonl(tmp_path / "train.jsonl", rows[:20])
    write_jsonl(tmp_path / "validation.jsonl", rows[20:])
    write_jsonl(tmp_path / "test.jsonl", rows[20:])  # with a test split, train is the whole train file in its order
    train, val = data.build(data_cfg(tmp_path, "data.format=instruction", "data.max_length=512"), tokenizer, 0)
    assert len(train) == 20 and len(val) == 4
    for row, example in zip(rows, train):
        prompt, scored = split(example)
        expected = ALPACA_INPUT.format(row["instruction"], row["input"]) if row["input"] else ALPACA.format(row["instruction"])
        assert tokenizer.decode(prompt) == expected
        assert scored == tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_train_on_prompt_scores_every_token(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    cfg = data_cfg(tmp_path / "a.jsonl", "data.format=instruction", "data.train_on_prompt=true", "data.max_length=512")
    train, _ = data.build(cfg, tokenizer, 0)
    assert all(torch.equal(e["input_ids"], e["labels"]) for e in train)


def test_max_response_chars_keeps_only_short_responses(tmp_path, tokenizer):
    rows = alpaca_rows()
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:2])
    cfg = data_cfg(tmp_path, "data.format=instruction", "data.max_response_chars=30",
                   "data.max_length=512", "data.validation_share=0.1")
    train, val = data.build(cfg, tokenizer, 0)
    kept = len([r for r in rows if len(r["output"]) <= 30])
    assert 0 < kept < len(rows) and len(train) + len(val) == kept
    assert all(len(tokenizer.decode(split(e)[1][:-1])) <= 30 for e in train)


def test_too_long_response_is_cut_at_its_end(tmp_path, tokenizer):
    rows = [{"instruction": "Count.", "input": "", "output": " ".join(str(i) for i in range(200))}] * 4
    write_jsonl(tmp_path / "a.jsonl", rows)
    train, _ = data.build(data_cfg(tmp_path / "a.jsonl", "data.format=instruction", "data.max_length=160"), tokenizer, 0)
    prompt, scored = split(train[0])
    assert len(prompt) + len(scored) == 160
    assert scored == tokenizer(rows[0]["output"], add_special_tokens=False)["input_ids"][: len(scored)]


def test_summarization_cuts_the_article_and_keeps_the_whole_summary(tmp_path, tokenizer):
    long_article = " ".join(f"Sentence {i} of a long article about the harbour." for i in range(60))
    rows = [
        {"article": long_article, "highlights": "The harbour opens.\nBoats return.", "id": "a"},
        {"article": "A short article.", "highlights": "Short.", "id": "b"},
        {"article": long_article, "highlights": "Many words. " * 80, "id": "c"},  # the summary alone is too long
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows[:2])
    train, _ = data.build(data_cfg(tmp_path, "data.format=summarization", "data.max_length=64"), tokenizer, 0)
    assert len(train) == 2  # the third cannot fit its summary: dropped, not cut
    for row, example in zip(rows, train):
        prompt, scored = split(example)
        assert len(prompt) + len(scored) <= 64
        assert tokenizer.decode(scored) == " " + row["highlights"] + EOS
        article_ids = tokenizer(row["article"], add_special_tokens=False)["input_ids"]
        tail = tokenizer("\nTL;DR:", add_special_tokens=False)["input_ids"]
        assert prompt[-len(tail):] == tail
        assert prompt[: -len(tail)] == article_ids[: len(prompt) - len(tail)]
    assert len(train[0]["input_ids"]) == 64  # the long article was cut just enough
    assert tokenizer.decode(train[1]["input_ids"]) == "A short article.\nTL;DR: Short." + EOS


OASST = [  # one message tree: a prompt, two replies, a follow-up, a reply to it; a second tree
    dict(message_id="p1", parent_id=None, role="prompter", text="What is a harbour?"),
    dict(message_id="a1", parent_id="p1", role="assistant", text="A sheltered place for boats."),
    dict(message_id="a2", parent_id="p1", role="assistant", text="Water where ships stay safe."),
    dict(message_id="p2", parent_id="a1", role="prompter", text="And a quay?"),
    dict(message_id="a3", parent_id="p2", role="assistant", text="The wall where ships tie up."),
    dict(message_id="p3", parent_id=None, role="prompter", text="Name a colour."),
    dict(message_id="a4", parent_id="p3", role="assistant", text="Blue."),
]


def test_conversation_pairs_score_the_reply(tmp_path, tokenizer):
    for part in ("train", "validation", "test"):
        write_jsonl(tmp_path / f"{part}.jsonl", OASST)
    train, _ = data.build(data_cfg(tmp_path, "data.format=conversation", "data.max_length=128"), tokenizer, 0)
    parents = {m["message_id"]: m for m in OASST}
    replies = [m for m in OASST if m["role"] == "assistant"]
    assert len(train) == len(replies)
    for reply, example in zip(replies, train):
        prompt, scored = split(example)
        assert tokenizer.decode(prompt) == f"### Human: {parents[reply['parent_id']]['text']} ### Assistant:"
        assert tokenizer.decode(scored) == " " + reply["text"] + EOS


def test_oasst1_as_text_is_the_assistant_replies_packed(tmp_path, tokenizer, monkeypatch):
    write_jsonl(tmp_path / "train.jsonl", OASST)
    write_jsonl(tmp_path / "validation.jsonl", OASST[:2])
    write_jsonl(tmp_path / "test.jsonl", OASST[:2])
    train, val = data.build(data_cfg("oasst1", f"data.files={tmp_path}", "data.max_length=500"), tokenizer, 0)
    replies = [m["text"] for m in OASST if m["role"] == "assistant"]
    assert tokenizer.decode(train[0]["input_ids"]) == EOS.join(replies) + EOS
    assert torch.equal(train[0]["labels"], train[0]["input_ids"])
    assert tokenizer.decode(val[0]["input_ids"]) == replies[0] + EOS


def test_local_pairs_with_field_mapping_and_template(tmp_path, tokenizer):
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"It is {2 * i}.", "note": "x"} for i in range(12)]
    write_jsonl(tmp_path / "qa.jsonl", rows)
    (tmp_path / "qa.yaml").write_text(
        "name: qa\nmodel: {name: m}\n"
        f"data:\n  dataset: {tmp_path / 'qa.jsonl'}\n  prompt_field: question\n  response_field: answer\n"
        '  template: "Q: {prompt}\\nA: {response}"\n  validation_share: 0.25\n'
    )
    train, val = data.build(load_recipe(tmp_path / "qa.yaml").data, tokenizer, 0)
    assert len(train) == 6 and len(val) == 3  # and 3 held out for test
    by_question = {r["question"]: r for r in rows}
    for example in train:
        prompt, scored = split(example)
        question = tokenizer.decode(prompt).removeprefix("Q: ").removesuffix("\nA:")
        assert tokenizer.decode(scored) == " " + by_question[question]["answer"] + EOS
    plain, _ = data.build(load_recipe(tmp_path / "qa.yaml", ["data.template=plain"]).data, tokenizer, 0)
    prompt, scored = split(plain[0])
    assert tokenizer.decode(prompt).endswith("?\n") and tokenizer.decode(scored).startswith("It is")


def test_padding_never_carries_loss(tmp_path, tokenizer, assets):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    cfg = data_cfg(tmp_path / "a.jsonl", "data.format=instruction", "data.template=plain", "data.max_length=128")
    train, _ = data.build(cfg, tokenizer, 0)
    examples = [train[i] for i in range(6)]
    assert len({len(e["input_ids"]) for e in examples}) > 1
    batch = data.collate(tokenizer.pad_token_id)(examples)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    model = load_model(ModelSettings(name=str(assets / "gpt2"))).eval()
    with torch.no_grad():
        batched, scored = causal_nll(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                     batch["labels"])
        one_by_one = [causal_nll(model(input_ids=e["input_ids"][None]).logits, e["labels"][None]) for e in examples]
    assert scored == sum(n for _, n in one_by_one) == sum(int((e["labels"][1:] != -100).sum()) for e in examples)
    assert torch.allclose(batched, sum(nll for nll, _ in one_by_one), rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["data.format=instruction", "data.template=Q: {prompt}"], "must hold {prompt} once, then {response} once"),
    (["data.format=instruction", "data.template=Q: {question} {prompt} {response}"], "it names {question}"),
    (["data.format=instruction", "data.template=chatml"], "neither a built-in template"),
    (["data.format=text", "data.template=alpaca"], "'data.template' does not apply"),
    (["data.label_field=label"], "'data.label_field' does not apply"),
    (["data.format=instruction", "data.prompt_field=question"], "no field 'question'"),
    (["data.files=elsewhere"], "data.files reads a registered data set"),
])
def test_bad_data_keys_are_one_clear_error(tmp_path, tokenizer, overrides, message):
    write_jsonl(tmp_path / "a.jsonl", alpaca_rows())
    with pytest.raises(UserError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        data.build(data_cfg(tmp_path / "a.jsonl", *overrides), tokenizer, 0)


def test_wrong_typed_or_unknown_data_keys_fail_in_the_recipe():
    with pytest.raises(UserError, match="data.train_on_prompt' must be bool, got str 'maybe'"):
        data_cfg("x.jsonl", "data.train_on_prompt=maybe")
    with pytest.raises(UserError, match="data.format' .*choose one of text, instruction"):
        data_cfg("x.jsonl", "data.format=chat")
    with pytest.raises(UserError, match="unknown recipe key 'data.prompt_feild'"):
        data_cfg("x.jsonl", "data.prompt_feild=q")
