"""`compare --plan` on a tiny suite with a search: every step's tokens, peak memory and time printed and in
plan.json before anything trains; the budget and offline refusals; once the suite has run, the report's
section that sets the plan beside what the suite took."""
import json
import sys

import pytest
import yaml

from conftest import ROOT, assert_one_clear_line, run_command, tiny_run, tiny_suite

TRIALS = ["search lora_r4 rung 1 slot 0", "search lora_r4 rung 1 slot 1", "search lora_r4 rung 2 slot 0"]


def compare(suite, cwd, *args, env=None):
    return run_command([sys.executable, "-m", "tunebench.compare", "--suite", str(suite), *args], cwd=cwd, env=env)


@pytest.fixture(scope="module")
def planned(assets, tmp_path_factory):
    """A one-recipe suite whose search trains 2 rates to step 2, the better one on to step 4 (the run itself)."""
    tmp = tmp_path_factory.mktemp("forecast")
    suite = tiny_suite(assets, [ROOT / "recipes" / "lora_r4.yaml"],
                       {"train.max_steps": 4, "train.eval_every": 2, "train.save_every": 4},
                       search={"rates": 2, "first_rung": 2, "reduction": 2, "extend": 0})
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(suite))
    return tmp, path, compare(path, tmp, "--plan")


def test_plan_prints_every_step_and_writes_plan_json_training_nothing(planned):
    tmp, _, result = planned
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout[result.stdout.index("plan of suite tiny"):]
    for step in ["baseline", *TRIALS, "lora_r4"]:
        assert f"\n{step} " in table
    assert "reused" in table and "predicted total:" in table and "calibration:" in table
    plan = json.loads((tmp / "runs" / "tiny" / "plan.json").read_text())
    rows = {r["row"]: r for r in plan["rows"]}
    assert list(rows) == ["baseline", *TRIALS, "lora_r4"]
    for name in TRIALS:  # 2 steps of 4 sequences of 32 tokens each; timed, and within the memory plan's reach
        assert rows[name]["tokens"] == 256 and rows[name]["train_s"] > 0
        assert 100 < rows[name]["peak_mb"] < 2 * rows[name]["plan_peak_mb"]
    assert rows[TRIALS[2]]["from"] == 2 and rows[TRIALS[2]]["to"] == 4  # resumes from rung 1's checkpoint
    assert rows["lora_r4"]["adopted"] and rows["lora_r4"]["train_s"] == 0 and rows["lora_r4"]["tokens"] == 512
    assert rows["baseline"]["eval_s"] > 0 and rows["lora_r4"]["eval_s"] > 0
    # The baseline's evaluation is the suite's own first step: run by the plan, kept, and out of what is left.
    assert rows["baseline"]["done"] and "(done)" in table
    assert json.loads((tmp / "runs" / "tiny" / "baseline" / "eval.json").read_text())["tasks"]["ppl"]
    steps = sum(r.get("train_s", 0) + r.get("eval_s", 0) for r in plan["rows"] if not r.get("done"))
    assert plan["total_s"] == pytest.approx(plan["suite_start_s"] + steps)
    assert plan["done_s"] == rows["baseline"]["eval_s"]
    assert plan["search_s"] == pytest.approx(sum(rows[t]["train_s"] for t in TRIALS))
    assert 0 < plan["calibration_s"] and len(plan["calibration"]) == 1  # trials and the run share one setting
    trained = [p.parent.name for p in (tmp / "runs").rglob("summary.json")]
    assert trained == ["baseline"] and not (tmp / "runs" / "tiny" / ".calibration").exists()  # the baseline: evaluated


def test_report_sets_the_plan_beside_what_the_suite_took(planned):
    tmp, path, _ = planned
    result = compare(path, tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "=== baseline: already evaluated" in result.stdout
    report = (tmp / "reports" / "tiny" / "report.md").read_text()
    section = report[report.index("## Predicted and measured"):]
    assert "`compare --plan` predicted" in section
    for step in ["baseline (evaluated by the plan)", *TRIALS, "lora_r4"]:
        assert f"\n| {step} |" in section
    check = json.loads((tmp / "reports" / "tiny" / "report.json").read_text())["plan_check"]
    measured = {r["step"]: r for r in check["rows"]}
    for name in TRIALS:
        assert measured[name]["train_measured_s"] > 0
    summary = json.loads((tmp / "runs" / "tiny" / "lora_r4" / "summary.json").read_text())
    assert measured["lora_r4"]["peak_measured_mb"] == summary["peak_cpu_rss_mb"]
    assert measured["lora_r4"]["train_measured_s"] == 0  # the search's trial, reused
    baseline = measured["baseline (evaluated by the plan)"]
    assert baseline["eval_measured_s"] == baseline["eval_predicted_s"] > 0 and check["total"]["measured_s"] > 0
    assert set(summary["time_split_s"]) == {"steps", "setup", "validation", "checkpoints", "final_saves"}


def test_a_budget_too_small_is_refused_in_one_line(planned):
    tmp, path, _ = planned
    before = (tmp / "runs" / "tiny" / "plan.json").read_bytes()
    result = compare(path, tmp, "--plan", "--budget-gb", "0.05")
    assert_one_clear_line(result, f"{TRIALS[0]} needs")
    assert "over the budget of 0.05 GB; no change tried fits" in result.stderr
    assert (tmp / "runs" / "tiny" / "plan.json").read_bytes() == before


def test_the_refusal_names_the_cheapest_change_that_fits(assets, tmp_path):
    from tunebench import forecast, plan
    from tunebench.errors import UserError
    from tunebench.models import load_config
    from tunebench.recipe import load_recipe

    # 256 x 128 tokens: activations of about 420 MB, so half the micro-batch saves 200 MB.
    recipe = load_recipe(ROOT / "recipes" / "full.yaml",
                         tiny_run(assets, tmp_path / "x", "train.micro_batch_size=256", "data.max_length=128"))
    as_is = plan.Planner(recipe, load_config(recipe.model), plan.Setup()).predict().peak
    budget_gb = (as_is - 100 * plan.MB) / plan.GB  # this process's memory, in the prediction, may grow a little meanwhile
    fits = "the cheapest change that fits: train.micro_batch_size=128 train.grad_accum=2"
    with pytest.raises(UserError, match=rf"^big needs .* over the budget .*; {fits} "):
        forecast.memory_plans([{"row": "big", "cost_key": "k", "recipe": recipe}], plan.Setup(), budget_gb)
    assert forecast.memory_plans([{"row": "big", "cost_key": "k", "recipe": recipe}], plan.Setup(), 100)["k"] > 0


def test_a_plan_that_needs_the_hub_offline_is_refused_in_one_line(tmp_path):
    suite = tmp_path / "hub.yaml"
    suite.write_text(yaml.safe_dump({"recipes": [str(ROOT / "recipes" / "full.yaml")]}))  # gpt2 on wikitext2
    result = compare(suite, tmp_path, "--plan", env={"HF_HOME": str(tmp_path / "empty_cache"), "HF_HUB_OFFLINE": "1"})
    assert_one_clear_line(result, "make demo")
    assert not (tmp_path / "runs").exists()
