"""lm-evaluation-harness tasks in evaluate.py: the same numbers as lm-eval's own command line on local task
files (a tiny model, the real SmolLM2), an adapter run the same as its merged model, forgetting measured on an
lm-eval task in the report, and bad input in one line."""
import json
import subprocess
import sys

import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_one_clear_line, run_script
from test_evaluate import assert_user_error, evaluate, evaluate_fails, read

MULTIPLE_CHOICE = [
    ("The capital of France is", ["Paris", "Berlin", "Rome"], 0),
    ("Two plus two equals", ["three", "four", "five"], 1),
    ("Water freezes at zero degrees", ["Fahrenheit", "Kelvin", "Celsius"], 2),
    ("The opposite of hot is", ["cold", "warm", "red"], 0),
    ("A dog says", ["moo", "woof", "meow"], 1),
]
CONTINUATIONS = [("The cat sat on the", " mat"), ("Once upon a", " time"), ("She opened the door and saw", " nothing"),
                 ("The history of the city", " began"), ("The sun rises in the", " east")]
FIGURES = {"tb_mc": ["acc", "acc_stderr", "acc_norm", "acc_norm_stderr"],
           "tb_ll": ["perplexity", "perplexity_stderr", "acc", "acc_stderr"]}


def write_tasks(folder):
    """A multiple-choice task and a loglikelihood task in lm-eval's task YAML, each on a local jsonl file."""
    folder.mkdir(parents=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                             for q, c, a in MULTIPLE_CHOICE))
    (folder / "ll.jsonl").write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in CONTINUATIONS))
    common = {"dataset_path": "json", "test_split": "test", "metadata": {"version": 1.0}}
    (folder / "tb_mc.yaml").write_text(yaml.safe_dump({
        "task": "tb_mc", **common, "dataset_kwargs": {"data_files": {"test": str(folder / "mc.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))
    (folder / "tb_ll.yaml").write_text(yaml.safe_dump({
        "task": "tb_ll", **common, "dataset_kwargs": {"data_files": {"test": str(folder / "ll.jsonl")}},
        "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
        "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]}))
    return folder


def lm_eval_command_line(model_dir, tasks_dir, out):
    """lm-eval's own command line on a model folder: {task: {figure: value}}."""
    result = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                             f"pretrained={model_dir},dtype=float32", "--device", "cpu", "--include_path", str(tasks_dir),
                             "--tasks", "tb_mc,tb_ll", "--batch_size", "1", "--output_path", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return {task: {k.split(",")[0]: v for k, v in figures.items() if "," in k} for task, figures in results["results"].items()}


def assert_same(tunebench_tasks, harness):
    for task, figures in FIGURES.items():
        ours = tunebench_tasks[f"lm_eval:{task}"]
        for figure in figures:
            assert ours[figure] == pytest.approx(harness[task][figure], rel=1e-5, abs=1e-7), (task, figure)
        assert (ours["version"], ours["num_fewshot"], ours["documents"]) == (1.0, 0, 5)


def parity(model_dir, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    evaluate("--model", model_dir, "--lm-eval", "tb_mc,tb_ll", "--lm-eval-include", tasks, "--out", tmp_path / "ours")
    ours = read(tmp_path / "ours" / "eval.json")
    harness = lm_eval_command_line(model_dir, tasks, tmp_path / "harness")
    assert_same(ours["tasks"], harness)
    assert len(ours["items"]["lm_eval:tb_mc"]["acc"]) == 5 and sum(ours["items"]["lm_eval:tb_mc"]["acc"]) / 5 == ours["tasks"]["lm_eval:tb_mc"]["acc"]
    assert "perplexity" not in ours["items"]["lm_eval:tb_ll"]  # not a mean over documents: nothing to resample
    return ours["tasks"], harness


def test_tiny_model_scores_as_lm_eval_command_line(assets, tmp_path):
    ours, harness = parity(assets / "gpt2", tmp_path)
    print("tiny", json.dumps({"tunebench": ours, "lm_eval": harness}))


def test_smollm2_scores_as_lm_eval_command_line(smollm2, tmp_path):
    ours, harness = parity(smollm2, tmp_path)
    print("smollm2", json.dumps({"tunebench": ours, "lm_eval": harness}))
    assert ours["lm_eval:tb_mc"]["acc"] >= 0.6  # a real model answers most of these; a broken scorer would not


def test_adapter_run_scores_as_its_merged_model_and_forgetting_reaches_the_report(assets, tmp_path):
    import torch

    from tunebench.methods import apply_method
    from tunebench.recipe import load_recipe, to_yaml

    tasks = write_tasks(tmp_path / "tasks")
    run = tmp_path / "runs" / "lora"
    recipe = load_recipe(None, [f"model.name={assets / 'gpt2'}", "data.dataset=unused", "method.type=lora", "method.r=4",
                                "eval.tasks=[ppl]", f"output_dir={run}"])
    tokenizer = AutoTokenizer.from_pretrained(assets / "gpt2")
    model = apply_method(AutoModelForCausalLM.from_pretrained(assets / "gpt2"), recipe.method, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, where the adapter changes nothing
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    (run / "summary.json").write_text(json.dumps({"name": "lora", "method": "lora", "model": str(assets / "gpt2"),
                                                  "trainable_params": 1, "total_params": 2}))
    common = ["--data-file", assets / "valid.txt", "--max-length", 64, "--max-tokens", 400, "--lm-eval-include", tasks,
              "--forgetting-lm-eval", "tb_mc,tb_ll"]
    evaluate("--run", run, *common)
    evaluate("--model", assets / "gpt2", "--tasks", "ppl", *common, "--out", tmp_path / "runs" / "baseline")
    adapter = read(run / "eval.json")
    assert adapter["forgetting"] == {"measure": "lm-eval", "tasks": ["lm_eval:tb_mc", "lm_eval:tb_ll"], "metric": "acc",
                                     "higher_is_better": True}

    merged = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(assets / "gpt2")
    PeftModel.from_pretrained(base, run / "final").merge_and_unload().save_pretrained(merged)
    AutoTokenizer.from_pretrained(assets / "gpt2").save_pretrained(merged)
    harness = lm_eval_command_line(merged, tasks, tmp_path / "harness")
    assert_same(adapter["tasks"], harness)
    untrained = read(tmp_path / "runs" / "baseline" / "eval.json")["tasks"]
    before, after = untrained["lm_eval:tb_ll"]["perplexity"], adapter["tasks"]["lm_eval:tb_ll"]["perplexity"]
    assert abs(before - after) > 1e-3 * before  # the adapter changed the scores: the parity is not the base's
    print("adapter", json.dumps({"tunebench_adapter": adapter["tasks"], "lm_eval_merged": harness, "untrained": untrained}))

    evaluate("report", tmp_path / "runs" / "baseline", run, "--out", tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    lost = sum(untrained[f"lm_eval:{t}"]["acc"] - adapter["tasks"][f"lm_eval:{t}"]["acc"] for t in ("tb_mc", "tb_ll")) / 2
    assert "forgetting: acc on the lm-eval tasks tb_mc, tb_ll, untrained minus trained, averaged over the tasks" in report
    assert "forgetting (acc, lm-eval) [95%]" in report and f"{lost:+.4f} [" in report
    assert (tmp_path / "report" / "learning_forgetting.png").is_file()


def test_bad_lm_eval_input_is_one_line_and_writes_nothing(assets, tmp_path, capsys):
    tasks = write_tasks(tmp_path / "tasks")
    out = tmp_path / "out"
    model = ["--model", assets / "gpt2", "--out", out]
    assert_user_error(*evaluate_fails(capsys, *model, "--lm-eval", "tb_mc", "--lm-eval-include", tmp_path / "nowhere"),
                      "--lm-eval-include", "is not a folder")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.yaml").write_text("task: bad\ndoc_to_text: [unclosed\n")
    assert_user_error(*evaluate_fails(capsys, *model, "--lm-eval", "bad", "--lm-eval-include", tmp_path / "broken"),
                      "bad.yaml", "not a task YAML lm-eval can read")
    assert_user_error(*evaluate_fails(capsys, *model, "--lm-eval", "arc_esay"), "unknown lm-eval task 'arc_esay'", "arc_easy")
    assert_user_error(*evaluate_fails(capsys, *model, "--lm-eval", "arc_easy"), "lm-eval task 'arc_easy'",
                      "Hugging Face hub", "--lm-eval-include")
    assert_user_error(*evaluate_fails(capsys, *model, "--lm-eval", "tb_mc", "--lm-eval-include", tasks,
                                      "--forgetting-lm-eval", "tb_mc", "--forgetting-metric", "f1"), "reports acc")
    assert not out.exists()
    # a suite checks the names before anything trains (evaluate.py --check-args)
    result = run_script("evaluate.py", "--check-args", "--model", "m", "--tasks", "ppl", "--lm-eval", "tb_mc",
                        "--lm-eval-include", tmp_path / "nowhere")
    assert_one_clear_line(result, "--lm-eval-include")


def test_soft_prompt_scores_each_continuation_from_the_text_tokens(assets, tmp_path):
    """A soft prompt's virtual tokens come first in the logits; each continuation is scored from the text's own."""
    import torch

    from tunebench.methods import apply_method
    from tunebench.recipe import load_recipe, to_yaml

    tasks = write_tasks(tmp_path / "tasks")
    run = tmp_path / "prompt"
    recipe = load_recipe(None, [f"model.name={assets / 'gpt2'}", "data.dataset=unused", "method.type=prompt_tuning",
                                "method.num_virtual_tokens=8", f"output_dir={run}"])
    tokenizer = AutoTokenizer.from_pretrained(assets / "gpt2")
    torch.manual_seed(0)
    model = apply_method(AutoModelForCausalLM.from_pretrained(assets / "gpt2"), recipe.method, tokenizer).eval()
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text(to_yaml(recipe), encoding="utf-8")
    model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    evaluate("--run", run, "--lm-eval", "tb_ll", "--lm-eval-include", tasks)
    figures = read(run / "eval.json")["tasks"]["lm_eval:tb_ll"]

    loglikelihoods = []
    with torch.no_grad():
        for context, target in CONTINUATIONS:
            context_ids, target_ids = tokenizer(context)["input_ids"], tokenizer(target)["input_ids"]
            ids = torch.tensor([context_ids + target_ids])
            logits = model(input_ids=ids).logits[0, 8:]  # the soft prompt's 8 positions first
            logprobs = logits[len(context_ids) - 1:-1].log_softmax(-1)
            loglikelihoods.append(logprobs.gather(1, torch.tensor(target_ids)[:, None]).sum().item())
    expected = torch.tensor(loglikelihoods).mean().neg().exp().item()  # the harness's perplexity: exp(-mean loglikelihood)
    assert figures["perplexity"] == pytest.approx(expected, rel=1e-5)
    base = read_base_perplexity(assets, tasks, tmp_path)
    assert abs(figures["perplexity"] - base) > 1e-3 * base  # the soft prompt was applied


def read_base_perplexity(assets, tasks, tmp_path):
    evaluate("--model", assets / "gpt2", "--lm-eval", "tb_ll", "--lm-eval-include", tasks, "--out", tmp_path / "base")
    return read(tmp_path / "base" / "eval.json")["tasks"]["lm_eval:tb_ll"]["perplexity"]


def test_forgetting_on_tasks_of_different_sizes_counts_each_task_once():
    from tunebench import verdict

    def run(name, method, mc, ll):
        return {"name": name, "method": method, "finished": True, "summary": {}, "recipe": None,
                "eval": {"lm_eval:a": {"acc": sum(mc) / len(mc)}, "lm_eval:b": {"acc": sum(ll) / len(ll)}},
                "items": {"lm_eval:a": {"acc": mc}, "lm_eval:b": {"acc": ll}},
                "forgetting": {"measure": "lm-eval", "tasks": ["lm_eval:a", "lm_eval:b"], "metric": "acc", "higher_is_better": True}}

    base = run("baseline", "baseline", [1.0, 1.0, 1.0, 1.0], [1.0, 0.0])
    trained = run("lora", "lora", [1.0, 0.0, 0.0, 1.0], [1.0, 1.0])  # lost 0.5 on a, gained 0.5 on b
    forgetting, (per_document, weights) = verdict.harness_forgetting(base, trained, base["forgetting"])
    assert forgetting == pytest.approx(0.0) and per_document.sum() / weights.sum() == pytest.approx(0.0)
    assert verdict.learning_and_forgetting([base, trained])["lora"]["forgetting"] == pytest.approx(0.0)
    assert verdict.forgetting_source([base, trained]).startswith("acc on the lm-eval tasks a, b, untrained minus trained")
