"""The compare driver end to end on a tiny real GPT-2: a suite of three recipes (one of which fails)
trains, evaluates, always evaluates the untrained model, and reports; a second run skips what is
done and resumes what was interrupted."""
import csv
import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, assert_one_clear_line, read_log, run_command, run_script, tiny_suite
from test_packing import instruction_rows
from tiny import write_jsonl


def compare(suite, cwd, env=None, timeout=1200):
    return run_command([sys.executable, "-m", "tunebench.compare", "--suite", str(suite)], cwd=cwd, env=env, timeout=timeout)


def write_suite(tmp_path, assets, recipes):
    suite = tiny_suite(assets, recipes, {"train.max_steps": 3, "train.eval_every": 3, "train.save_every": 1})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path, suite["overrides"]


def read(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def suite_run(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    bad = tmp / "lora_nowhere.yaml"  # a valid recipe whose LoRA target matches no module: fails in train.py
    bad.write_text("name: lora_nowhere\nmethod: {type: lora, r: 4, targets: [no_such_module]}\n")
    suite, overrides = write_suite(tmp, assets, [ROOT / "recipes" / "full.yaml", ROOT / "recipes" / "lora_r4.yaml", bad])
    # lora_r4 is interrupted after one step before the suite starts: the suite must resume it.
    args = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    stopped = run_script("train.py", "--recipe", ROOT / "recipes" / "lora_r4.yaml", *args, "name=lora_r4",
                         "output_dir=runs/tiny/lora_r4", "--stop-after-steps", "1", cwd=tmp)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    first = compare(suite, tmp)
    return tmp, suite, first


def test_suite_trains_evaluates_and_reports(suite_run):
    tmp, _, first = suite_run
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # one run failed
    assert "resuming runs/tiny/lora_r4 from step-1" in first.stdout
    runs = tmp / "runs" / "tiny"
    assert (runs / "baseline" / "eval.json").is_file() and read(runs / "baseline" / "summary.json")["method"] == "baseline"
    for name in ("full", "lora_r4"):
        assert read(runs / name / "summary.json")["final_step"] == 3
        assert "ppl" in read(runs / name / "eval.json")["tasks"]
    assert "report: reports/tiny/report.md" in first.stdout
    for name in ("report.md", "report.csv", "report.json"):
        assert (tmp / "reports" / "tiny" / name).is_file()
    for name in ("loss_curves.png", "pareto.png"):
        assert (tmp / "reports" / "tiny" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_numbers_are_the_runs_numbers(suite_run):
    tmp, _, _ = suite_run
    runs = tmp / "runs" / "tiny"
    with open(tmp / "reports" / "tiny" / "report.csv", newline="") as f:
        rows = {row["name"]: row for row in csv.DictReader(f)}
    assert list(rows) == ["baseline", "full", "lora_r4", "lora_nowhere"]
    for name in ("baseline", "full", "lora_r4"):
        summary, tasks = read(runs / name / "summary.json"), read(runs / name / "eval.json")["tasks"]
        assert float(rows[name]["ppl.ppl"]) == pytest.approx(tasks["ppl"]["ppl"], rel=1e-12)
        assert float(rows[name]["trainable_params"]) == summary["trainable_params"]
        if name != "baseline":
            for key in ("best_val_loss", "best_train_loss", "train_time_s", "tokens_per_s", "artifact_mb"):
                assert float(rows[name][key]) == pytest.approx(summary[key], rel=1e-12), (name, key)
    # The untrained model, the full fine-tune and LoRA were measured on the same text.
    assert len({read(runs / n / "eval.json")["tasks"]["ppl"]["tokens"] for n in ("baseline", "full", "lora_r4")}) == 1


def test_failed_run_is_recorded_and_shown(suite_run):
    tmp, _, _ = suite_run
    error = (tmp / "runs" / "tiny" / "lora_nowhere" / "error.txt").read_text()
    assert error.startswith("training failed with exit status 2") and "matches no module" in error
    md = (tmp / "reports" / "tiny" / "report.md").read_text()
    assert "| lora | lora_nowhere | failed |" not in md  # it never wrote a recipe.yaml: method unknown
    failed_line = next(line for line in md.splitlines() if line.startswith("- **lora_nowhere**"))
    assert "matches no module" in failed_line


def test_second_run_skips_what_is_done(suite_run):
    tmp, suite, _ = suite_run
    runs = tmp / "runs" / "tiny"
    before = {n: (runs / n / "summary.json").stat().st_mtime_ns for n in ("full", "lora_r4")}
    evals = {n: (runs / n / "eval.json").stat().st_mtime_ns for n in ("baseline", "full", "lora_r4")}
    second = compare(suite, tmp)
    assert second.returncode == 1
    assert second.stdout.count("already trained") == 2 and second.stdout.count("already evaluated") == 3
    assert {n: (runs / n / "summary.json").stat().st_mtime_ns for n in before} == before
    assert {n: (runs / n / "eval.json").stat().st_mtime_ns for n in evals} == evals
    assert "matches no module" in (runs / "lora_nowhere" / "error.txt").read_text()  # tried again, failed again


def test_unreachable_hub_says_so_in_one_line(tmp_path):
    suite = tmp_path / "hub.yaml"
    suite.write_text(yaml.safe_dump({"recipes": [str(ROOT / "recipes" / "full.yaml")]}))  # gpt2 on wikitext2
    result = compare(suite, tmp_path, env={"HF_HOME": str(tmp_path / "empty_cache"), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "make demo" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content,expected", [
    ({"recipes": ["recipes/nowhere.yaml"]}, "recipe file 'recipes/nowhere.yaml' does not exist"),
    ({"recipes": ["recipes/full.yaml"], "seed": [1]}, "unknown key 'seed'"),
    ({"recipes": ["recipes/full.yaml"], "overrides": {"train.max_step": 5}}, "did you mean 'train.max_steps'"),
    ({"recipes": ["recipes/full.yaml"], "overrides": {"train.lr": float("nan")}}, "'train.lr' must be a finite number"),
    ({"recipes": ["recipes/full.yaml"], "seeds": [1, 2**40]}, "'train.seed' must be a seed from 0 to 4294967295"),
    ({"recipes": ["recipes/full.yaml"], "runs_dir": "README.md/runs"}, "lies beneath 'README.md', which is a file"),
    ({"recipes": ["recipes/full.yaml"], "name": "../escape"}, "'name' is '../escape'"),
    ({"recipes": ["recipes/full.yaml"], "overrides": {"eval.tasks": ["wikitext2"]}, "eval_args": ["--max-tokens", -5]},
     "eval_args ['--max-tokens', '-5']: argument --max-tokens: expected a positive whole number"),
])
def test_bad_suite_is_one_line_and_exit_2(tmp_path, content, expected):
    suite = tmp_path / "bad.yaml"
    suite.write_text(yaml.safe_dump(content))
    result = compare(suite, ROOT)
    assert result.returncode == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_suite_file_not_utf8_or_a_folder(tmp_path):
    binary = tmp_path / "bad.yaml"
    binary.write_bytes(b"\xff\xfe\x00recipes: []")
    for suite, expected in ((binary, "is not valid YAML"), (tmp_path, "is a folder; give a YAML file")):
        result = compare(suite, ROOT)
        assert result.returncode == 2 and expected in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_judge_in_eval_args_compares_each_run_with_its_own_baseline(tmp_path):
    from tunebench import compare
    from tunebench.recipe import ModelSettings, Recipe

    def run(model):
        return {"recipe": Recipe(model=ModelSettings(name=model))}

    suite = {"eval_args": ["--limit", "5"], "runs_dir": tmp_path}
    assert compare.judge_against(run("gpt2"), suite, ["gpt2"]) == []  # no judge: nothing added
    suite["eval_args"] += ["--judge", "http://127.0.0.1:8000/v1", "--judge-model", "m"]
    assert compare.judge_against(run("gpt2"), suite, ["gpt2"]) == ["--judge-against", str(tmp_path / "baseline")]
    assert compare.judge_against(run("models/b"), suite, ["models/a", "models/b"]) == ["--judge-against", str(tmp_path / "baseline-b")]


def instruction_suite(assets, tmp_path, **overrides) -> Path:
    """full and prompt_tuning on short instruction examples, which full alone would pack."""
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train.jsonl", instruction_rows())
    write_jsonl(tmp_path / "data" / "validation.jsonl", instruction_rows(8, seed=1))
    shared = {"data.dataset": str(tmp_path / "data"), "data.validation_file": None, "data.format": "instruction",
              "data.template": "plain", "data.max_length": 64, "train.max_steps": 2, "train.eval_every": 2,
              "train.save_every": 2, **overrides}
    suite = tiny_suite(assets, [ROOT / "recipes" / "full.yaml", ROOT / "recipes" / "prompt_tuning.yaml"], shared)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_a_suite_with_a_soft_prompt_packs_no_run(assets, tmp_path):
    """A soft prompt is never packed: packed, full would see several times more examples per step."""
    result = compare(instruction_suite(assets, tmp_path), tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = tmp_path / "runs" / "tiny"
    logs = {name: [(r["step"], r["tokens"]) for r in read_log(runs / name)] for name in ("full", "prompt_tuning")}
    assert logs["full"] == logs["prompt_tuning"]
    for name in ("full", "prompt_tuning"):
        assert read(runs / name / "summary.json")["packing"] == "not packed (data.packing is false)"
    md = (tmp_path / "reports" / "tiny" / "report.md").read_text()
    assert ("- **packing**: off for every run (prompt_tuning adds virtual tokens), so every method saw the same "
            "examples in the same order") in md


def test_a_suite_that_packs_a_soft_prompt_is_one_line_and_exit_2(assets, tmp_path):
    result = compare(instruction_suite(assets, tmp_path, **{"data.packing": True}), tmp_path)
    assert_one_clear_line(result, "data.packing is true, but prompt_tuning adds virtual tokens")
    assert not (tmp_path / "runs").exists()
