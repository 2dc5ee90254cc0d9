"""evaluate.py as a user runs it: baseline and run evaluation, adapters, soft prompts, generation, bad input."""
import importlib.util
import json
import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
from conftest import ROOT, run_script
from test_metrics import plain_loop_nll
from tunebench import data, data_rows
from tunebench.methods import apply_method, count_params
from tunebench.recipe import load_recipe, to_yaml


_spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "evaluate.py")
evaluate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_script)


def evaluate(*args):
    """evaluate.py in this process (a subprocess would spend most of its time importing torch)."""
    evaluate_script.main([str(a) for a in args])


def evaluate_fails(capsys, *args):
    """Run evaluate.py in this process, expecting a usage error: (stderr, exit status)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate(*args)
    return capsys.readouterr().err, exit_info.value.code


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def first_tokens(assets, n):
    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    ids = tokenizer((assets / "valid.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:n]
    return tokenizer, ids


def assert_user_error(stderr, code, *words):
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert lines[-1].startswith("error: ") and sum(line.startswith("error:") for line in lines) == 1
    for word in words:
        assert word in lines[-1]


def test_baseline_perplexity_and_summary(assets, tmp_path, capsys):
    out = tmp_path / "baseline"
    evaluate("--model", assets / "gpt2", "--tasks", "ppl", "--data-file", assets / "valid.txt",
             "--max-length", 64, "--stride", 24, "--max-tokens", 500, "--batch-size", 3, "--out", out)
    printed = capsys.readouterr().out
    ppl = read(out / "eval.json")["tasks"]["ppl"]
    assert (ppl["tokens"], ppl["max_length"], ppl["stride"]) == (500, 64, 24)
    tokenizer, ids = first_tokens(assets, 500)
    model = AutoModelForCausalLM.from_pretrained(assets / "gpt2").eval()
    nll, scored = plain_loop_nll(model, ids, tokenizer.eos_token_id, 64, 24)
    assert ppl["ppl"] == pytest.approx(torch.tensor(nll / scored).exp().item(), rel=1e-5)
    assert ppl["words"] == len(tokenizer.decode(ids).split())
    assert ppl["word_ppl"] == pytest.approx(ppl["ppl"] ** (500 / ppl["words"]), rel=1e-6)
    assert f"{ppl['ppl']:.4f}" in printed  # the table
    assert read(out / "eval.json")["hardware"]["threads_per_process"] == torch.get_num_threads()
    summary = read(out / "summary.json")
    assert summary == {"name": "baseline", "method": "baseline", "model": str(assets / "gpt2"),
                       "trainable_params": 0, "total_params": count_params(model)[1]}
    other = evaluate_fails(capsys, "--model", assets / "llama", "--tasks", "ppl", "--data-file", assets / "valid.txt", "--out", out)
    assert_user_error(*other, "holds results of", "another --out")


def test_adapter_run_equals_its_merged_model(assets, tmp_path):
    run = tmp_path / "runs" / "lora"
    trained = run_script(
        "train.py", "--recipe", ROOT / "recipes" / "full.yaml", f"model.name={assets / 'gpt2'}", f"data.dataset={assets / 'train.txt'}",
        f"data.validation_file={assets / 'valid.txt'}", "data.max_length=64", "train.max_steps=4", "train.micro_batch_size=4",
        "train.lr=3e-2", "train.scheduler=constant", "train.eval_max_batches=1", "method.type=lora", "method.r=4", "eval.tasks=[ppl]", f"output_dir={run}",
    )
    assert trained.returncode == 0, trained.stderr
    args = ["--data-file", assets / "valid.txt", "--max-length", 64, "--max-tokens", 400]
    evaluate("--run", run, *args)  # tasks from the recipe's eval.tasks
    evaluation = read(run / "eval.json")
    assert evaluation["method"] == "lora" and evaluation["tasks"]["ppl"]["tokens"] == 400

    tokenizer, ids = first_tokens(assets, 400)
    base = AutoModelForCausalLM.from_pretrained(assets / "gpt2").eval()
    base_nll, _ = plain_loop_nll(base, ids, tokenizer.eos_token_id, 64, 32)
    merged = PeftModel.from_pretrained(base, run / "final").merge_and_unload().eval()
    merged_nll, _ = plain_loop_nll(merged, ids, tokenizer.eos_token_id, 64, 32)
    run_nll = math.log(evaluation["tasks"]["ppl"]["ppl"]) * 400
    assert run_nll == pytest.approx(merged_nll, rel=1e-6)
    lora_b = [t for k, t in load_file(run / "final" / "adapter_model.safetensors").items() if "lora_B" in k]
    assert lora_b and all(t.abs().max() > 0 for t in lora_b)  # the adapter trained: it is not the identity
    assert abs(run_nll - base_nll) > 10 * abs(run_nll - merged_nll)  # and its effect is far above rounding

    # A second evaluation adds its task to eval.json and keeps the first one's.
    evaluate("--run", run, "--tasks", "lambada", *args, "--limit", 5)
    tasks = read(run / "eval.json")["tasks"]
    assert tasks["ppl"] == evaluation["tasks"]["ppl"] and tasks["lambada"]["examples"] == 5


def test_soft_prompt_run_scores_only_text_tokens(assets, tmp_path, capsys):
    run = tmp_path / "prompt"
    recipe = load_recipe(None, [f"model.name={assets / 'gpt2'}", "data.dataset=unused", "method.type=prompt_tuning",
                                "method.num_virtual_tokens=8", f"output_dir={run}"])
    tokenizer, ids = first_tokens(assets, 300)
    model = apply_method(AutoModelForCausalLM.from_pretrained(assets / "gpt2"), recipe.method, tokenizer).eval()
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")

    evaluate("--run", run, "--tasks", "ppl", "--data-file", assets / "valid.txt", "--max-tokens", 300)
    ppl = read(run / "eval.json")["tasks"]["ppl"]
    assert (ppl["tokens"], ppl["max_length"], ppl["stride"]) == (300, 120, 60)  # 128 positions minus 8 virtual tokens
    nll, _ = plain_loop_nll(model, ids, tokenizer.eos_token_id, 120, 60)
    assert ppl["ppl"] == pytest.approx(torch.tensor(nll / 300).exp().item(), rel=1e-5)

    # Generation: batches of a soft-prompted model hold prompts of one length (peft ignores position ids).
    evaluate("--run", run, "--tasks", "instruction", "--data-file", generation_data(tmp_path / "g.jsonl"), "--max-new-tokens", 8,
             "--batch-size", 1)
    one_by_one = read(run / "eval.json")["tasks"]["instruction"]
    evaluate("--run", run, "--tasks", "instruction", "--data-file", tmp_path / "g.jsonl", "--max-new-tokens", 8, "--batch-size", 6)
    assert read(run / "eval.json")["tasks"]["instruction"] == {**one_by_one, "batch_size": 6}

    too_long = evaluate_fails(capsys, "--run", run, "--tasks", "ppl", "--data-file", assets / "valid.txt", "--max-length", 128)
    assert_user_error(*too_long, "--max-length 128", "virtual tokens", "120")


def generation_data(path):
    """Six examples for every generation task in one jsonl file, prompts of different lengths."""
    rows = [
        {"text": p, "article": p[:600], "highlights": "\n".join(p.split(". ")[:2]), "instruction": p.split(".")[0][:80],
         "input": "" if i % 2 else p[100:160 + 20 * i], "output": p[200:300]}
        for i, p in enumerate(tiny.prose()[60:66])
    ]
    return tiny.write_jsonl(path, rows)


def test_generation_tasks_score_and_do_not_depend_on_batch_size(assets, tmp_path):
    data_file = generation_data(tmp_path / "tasks.jsonl")
    scores = []
    for batch_size in (1, 4):
        out = tmp_path / f"bs{batch_size}"
        evaluate("--model", assets / "gpt2", "--tasks", "continuation,summarization,instruction", "--data-file", data_file,
                 "--max-new-tokens", 12, "--prompt-tokens", 16, "--batch-size", batch_size, "--out", out)
        scores.append(read(out / "eval.json")["tasks"])
    assert scores[0] == {task: {**values, "batch_size": 1} for task, values in scores[1].items()}
    for task, values in scores[0].items():
        assert values["examples"] == 6
        for metric in ("bleu", "sacrebleu", "rouge1", "rouge2", "rougeL", "rougeLsum", "ter", "chrf"):
            assert isinstance(values[metric], float)
        assert values["meteor"] is not None or values["meteor_reason"]
        assert values["sacrebleu_signature"].startswith("nrefs:1")

    # generations.jsonl beside eval.json: every example's prompt, reference and output, the same at any batch size.
    written = [[json.loads(line) for line in (tmp_path / f"bs{b}" / "generations.jsonl").read_text().splitlines()] for b in (1, 4)]
    assert written[0] == written[1]
    rows = [json.loads(line) for line in data_file.read_text().splitlines()]
    instruction = [r for r in written[0] if r["task"] == "instruction"]
    assert [r["id"] for r in instruction] == list(range(6))
    assert [r["reference"] for r in instruction] == [row["output"].strip() for row in rows]
    assert all(r["prompt"].rstrip().endswith("### Response:") for r in instruction)  # the end of the template the model read
    assert all(isinstance(r["output"], str) for r in written[0]) and any(r["output"] for r in written[0])
    assert {r["task"] for r in written[0]} == {"continuation", "summarization", "instruction"}
    # Evaluating one task again replaces its lines and keeps the others'.
    evaluate("--model", assets / "gpt2", "--tasks", "instruction", "--data-file", data_file, "--max-new-tokens", 12,
             "--limit", 2, "--out", tmp_path / "bs4")
    again = [json.loads(line) for line in (tmp_path / "bs4" / "generations.jsonl").read_text().splitlines()]
    assert [r for r in again if r["task"] != "instruction"] == [r for r in written[1] if r["task"] != "instruction"]
    assert [r for r in again if r["task"] == "instruction"] == instruction[:2]


def test_full_model_run_is_scored_on_the_instructions_it_held_out(assets, tmp_path):
    rows = [{"question": f"Explain topic {i}.", "answer": p[:120]} for i, p in enumerate(tiny.prose()[:10])]
    run = tmp_path / "sft"
    recipe = load_recipe(None, [f"model.name={assets / 'gpt2'}", f"data.dataset={tiny.write_jsonl(tmp_path / 'qa.jsonl', rows)}",
                                "data.prompt_field=question", "data.response_field=answer", "data.template=plain",
                                "data.validation_share=0.3", "train.seed=7", f"output_dir={run}"])
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
    AutoModelForCausalLM.from_pretrained(assets / "gpt2").save_pretrained(run / "final")  # a "full" run's model
    AutoTokenizer.from_pretrained(assets / "tokenizer").save_pretrained(run / "final")
    evaluate("--run", run, "--tasks", "instruction", "--max-new-tokens", 8)
    scores = read(run / "eval.json")["tasks"]["instruction"]
    assert scores["examples"] == 3  # the test share train.py holds out: 30 % of 10 rows
    assert "test (share 0.3" in scores["data"] and "seed 7" in scores["data"] and "'plain'" in scores["data"]

    # The rows scored are the ones train.py held out with the recipe's seed (7), not --seed's default (42).
    scorer = evaluate_script.Scorer(None, AutoTokenizer.from_pretrained(assets / "tokenizer"), torch.device("cpu"),
                                    "fp32", 128, 64, 0)
    args = evaluate_script.parse_args(["--run", str(run), "--tasks", "instruction", "--max-new-tokens", "8"])
    examples, _ = evaluate_script.prompt_response_examples("instruction", scorer, args, recipe, 120)
    raw, spec = data_rows.load_raw(recipe.data)
    held_out = {seed: data_rows.split_rows(raw, recipe.data, spec, seed)[2]["answer"] for seed in (7, 42)}
    assert held_out[7] != held_out[42]  # the two seeds hold out different rows: the wrong one would fail here
    assert [response for _, response in examples] == held_out[7]


def test_a_file_without_splits_is_evaluated_on_rows_it_neither_trained_nor_validated_on(assets, tmp_path):
    """Validation picks the learning rate and the best step: the rows that score the comparison are a third part."""
    rows = [{"instruction": f"Say row {i}.", "input": "", "output": f"Row {i}: {p[:40]}"} for i, p in enumerate(tiny.prose()[:40])]
    recipe = load_recipe(None, ["name=rows", f"model.name={assets / 'gpt2'}", f"data.dataset={tiny.write_jsonl(tmp_path / 'rows.jsonl', rows)}",
                                "data.validation_share=0.2", "data.template=plain"])
    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    train, validation = data.build(recipe.data, tokenizer, recipe.train.seed)

    def row_numbers(examples):
        texts = [tokenizer.decode(examples[i]["input_ids"]) for i in range(len(examples))]
        return [int(n) for text in texts for n in re.findall(r"Say row (\d+)\.", text)]

    scorer = evaluate_script.Scorer(None, tokenizer, torch.device("cpu"), "fp32", 128, 64, 0)
    args = evaluate_script.parse_args(["--model", "m", "--tasks", "instruction"])
    examples, source = evaluate_script.prompt_response_examples("instruction", scorer, args, recipe, 120)
    evaluated = [int(re.match(r"Row (\d+):", response).group(1)) for _, response in examples]
    trained, validated = row_numbers(train), row_numbers(validation)
    assert len(evaluated) == len(validated) == 8 and "test" in source
    assert sorted(trained + validated + evaluated) == list(range(40))  # each row in exactly one part


def test_bad_input_is_one_line_and_exit_2(assets, tmp_path, capsys):
    gpt2, valid = assets / "gpt2", assets / "valid.txt"
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "recipe.yaml").write_text("name: unfinished\n", encoding="utf-8")
    cases = [
        ([], "--run", "--model"),
        (["--model", gpt2, "--tasks", "wikitext2,nope"], "unknown task 'nope'", "lambada"),
        (["--run", tmp_path / "unfinished"], "no final/"),
        (["--run", tmp_path / "missing"], "not a run directory"),
        (["--model", gpt2, "--tasks", "ppl", "--data-file", tmp_path / "missing.txt"], "missing.txt", "does not exist"),
        (["--model", gpt2, "--tasks", "ppl"], "--data-file"),
        (["--model", gpt2, "--tasks", "ppl", "--data-file", valid, "--max-length", 32, "--stride", 64], "--stride 64"),
        (["--model", gpt2, "--tasks", "ppl", "--data-file", valid, "--stride", 0], "--stride", "positive"),
    ]
    for args, *words in cases:  # caught before a model loads (the stride once the model's context is known): as a user runs it
        result = run_script("evaluate.py", *args)
        assert_user_error(result.stderr, result.returncode, *words)
    out = tmp_path / "never"
    beyond = evaluate_fails(capsys, "--model", gpt2, "--tasks", "ppl", "--data-file", valid, "--max-length", 1000, "--out", out)
    assert_user_error(*beyond, "--max-length 1000", "context of 128")
    assert not out.exists()  # nothing written
