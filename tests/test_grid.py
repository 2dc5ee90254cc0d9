"""A grid over recipe keys on a tiny real GPT-2: one run per combination, named by its values (a method
key only for the recipes of that method), and a report section and plot of the metric against each key."""
import json
import sys

import pytest
import yaml

from conftest import run_command
from test_search import RECIPES, base_suite, read, write


@pytest.fixture(scope="module")
def gridded(assets, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    suite = base_suite(assets, grid={"method.r": [2, 4], "train.max_steps": [2, 3]})
    suite["overrides"]["train.eval_every"] = 1
    path = write(tmp / "tiny.yaml", suite)
    result = run_command([sys.executable, "-m", "tunebench.compare", "--suite", str(path)], cwd=tmp, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp


def test_one_run_per_combination_named_by_its_values(gridded):
    runs = gridded / "runs" / "tiny"
    names = sorted(p.name for p in runs.iterdir() if (p / "summary.json").is_file())
    assert names == ["baseline", "full-max_steps2", "full-max_steps3",  # method.r is LoRA's key: full runs once per value of the rest
                     "lora_r4-r2-max_steps2", "lora_r4-r2-max_steps3", "lora_r4-r4-max_steps2", "lora_r4-r4-max_steps3"]
    recipe = yaml.safe_load((runs / "lora_r4-r2-max_steps3" / "recipe.yaml").read_text())
    assert recipe["method"]["r"] == 2 and recipe["train"]["max_steps"] == 3
    assert read(runs / "lora_r4-r2-max_steps3" / "summary.json")["final_step"] == 3


def test_report_plots_the_metric_against_each_key(gridded):
    out = gridded / "reports" / "tiny"
    runs = gridded / "runs" / "tiny"
    data = json.loads((out / "report.json").read_text())["grid"]
    ppl = {name: read(runs / name / "eval.json")["tasks"]["ppl"]["ppl"]
           for name in ("lora_r4-r2-max_steps2", "lora_r4-r2-max_steps3", "full-max_steps2", "full-max_steps3")}
    # LoRA at r=2: the mean over the other swept key's values; full: one line along max_steps, none along r.
    lora_r = {value: quality for value, quality, _ in data["method.r"]["lora_r4"]}
    assert lora_r[2] == pytest.approx((ppl["lora_r4-r2-max_steps2"] + ppl["lora_r4-r2-max_steps3"]) / 2)
    assert "full" not in data["method.r"]
    assert [value for value, _, _ in data["train.max_steps"]["full"]] == [2, 3]
    assert data["train.max_steps"]["full"][0][1] == pytest.approx(ppl["full-max_steps2"])
    md = (out / "report.md").read_text()
    assert "## Grid" in md and "| method.r | 2 | 4 |" in md and "| train.max_steps | 2 | 3 |" in md
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_search_tunes_every_grid_point(assets, tmp_path):
    """Each grid point is a method of its own for the search: its own study and trials, and its runs train
    at its own rate. One rate each keeps it short: the trial is then the comparison run itself."""
    from tunebench import search

    suite = base_suite(assets, grid={"method.r": [2, 4]}, search={"rates": 1})
    suite["recipes"] = RECIPES[1:]
    suite["overrides"]["train.eval_every"] = 6  # the trials' (one rung: validated at its end)
    path = write(tmp_path / "tiny.yaml", suite)
    result = run_command([sys.executable, "-m", "tunebench.compare", "--suite", str(path)], cwd=tmp_path, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = read(tmp_path / "runs" / "tiny" / "search" / "search.json")["methods"]
    assert sorted(found) == ["lora_r4-r2", "lora_r4-r4"]
    for point, r in (("lora_r4-r2", 2), ("lora_r4-r4", 4)):
        trial = tmp_path / found[point]["folder"] / search.run_name(found[point]["best_lr"])
        assert yaml.safe_load((trial / "recipe.yaml").read_text())["method"]["r"] == r
        run = yaml.safe_load((tmp_path / "runs" / "tiny" / point / "recipe.yaml").read_text())
        assert (run["method"]["r"], run["train"]["lr"]) == (r, found[point]["best_lr"])
        assert f"=== {point}: the search's trial at rate" in result.stdout
    md = (tmp_path / "reports" / "tiny" / "report.md").read_text()
    assert "| lora_r4-r2 | 0.0002 |" in md and "| lora_r4-r4 | 0.0002 |" in md  # the search table, a row each
