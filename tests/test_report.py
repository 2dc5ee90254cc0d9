"""tunebench.report on real run folders written by train.py (tiny GPT-2, a few steps): the table holds
the runs' own numbers, seeds aggregate to mean ± std, a failed or unfinished run shows as failed while
the others still report, and the plots are real PNG images."""
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import ROOT, run_script
from tunebench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_args(assets, run_dir, recipe, *extra):
    return [
        sys.executable, str(ROOT / "train.py"), "--recipe", str(ROOT / "recipes" / f"{recipe}.yaml"),
        f"model.name={assets / 'gpt2'}", f"data.dataset={assets / 'train.txt'}", f"data.validation_file={assets / 'valid.txt'}",
        "data.max_length=32", "train.micro_batch_size=4", "train.max_steps=4", "train.eval_every=2",
        "train.eval_max_batches=2", "train.log_every=1", f"output_dir={run_dir}", *extra,
    ]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """Two seeds of full fine-tuning and one LoRA run (trained in parallel), an unfinished run, a run
    that failed before it started, and a baseline folder as evaluate.py --model writes it."""
    base = tmp_path_factory.mktemp("runs")
    jobs = {
        "full-seed1": train_args(assets, base / "full-seed1", "full", "train.seed=1", "train.lr=3e-3"),
        "full-seed2": train_args(assets, base / "full-seed2", "full", "train.seed=2", "train.lr=3e-3"),
        "lora_r4": train_args(assets, base / "lora_r4", "lora_r4", "train.lr=1e-2"),
    }
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = {name: subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in jobs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"

    # Interrupted: a run with its log and checkpoints but no summary.json.
    shutil.copytree(base / "lora_r4", base / "lora_unfinished")
    (base / "lora_unfinished" / "summary.json").unlink()
    # Failed before training: only the error.txt that the compare driver writes.
    (base / "broken").mkdir()
    (base / "broken" / "error.txt").write_text(
        "training failed with exit status 2: python train.py ...\nerror: data file 'nowhere.txt' does not exist\n"
    )
    (base / "baseline").mkdir()
    (base / "baseline" / "summary.json").write_text(json.dumps(
        {"name": "baseline", "method": "baseline", "model": str(assets / "gpt2"), "trainable_params": 0, "total_params": 45952}
    ))
    # eval.json as evaluate.py writes it: results beside the settings they were measured with.
    for i, name in enumerate(["baseline", "full-seed1", "full-seed2", "lora_r4"]):
        tasks = {"ppl": {"ppl": 400.0 - 10 * i, "word_ppl": 900.5 + i, "tokens": 2048, "max_length": 128, "stride": 64},
                 "continuation": {"bleu": 1.25 * i, "rougeL": 0.1, "meteor": None, "meteor_reason": "no WordNet data"}}
        (base / name / "eval.json").write_text(json.dumps({"tasks": tasks}))
    order = ["baseline", "full-seed1", "full-seed2", "lora_r4", "lora_unfinished", "broken"]
    out = base / "report"
    report.main([str(base / n) for n in order] + ["--out", str(out)])
    return base, out


def summary(base, name):
    return json.loads((base / name / "summary.json").read_text())


def csv_rows(out):
    with open(out / "report.csv", newline="") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


def test_table_holds_the_runs_own_numbers(runs):
    base, out = runs
    rows = csv_rows(out)
    assert list(rows) == ["baseline", "full", "lora_r4", "lora_unfinished", "broken"]
    lora = summary(base, "lora_r4")
    for key in ("trainable_params", "total_params", "artifact_mb", "train_time_s", "tokens_per_s",
                "peak_cpu_rss_mb", "optimizer_state_mb", "best_train_loss", "best_val_loss"):
        assert float(rows["lora_r4"][key]) == pytest.approx(lora[key], rel=1e-12), key
    assert rows["lora_r4"]["peak_gpu_mem_mb"] == ""  # null on a CPU: not measured, never 0
    assert float(rows["lora_r4"]["trainable_pct"]) == pytest.approx(100 * lora["trainable_params"] / lora["total_params"])
    assert float(rows["lora_r4"]["ppl.ppl"]) == 370.0 and float(rows["lora_r4"]["continuation.bleu"]) == 3.75
    assert float(rows["baseline"]["ppl.ppl"]) == 400.0 and float(rows["baseline"]["trainable_params"]) == 0
    # Settings of a measurement (tokens, stride) and non-numbers are not columns.
    assert "ppl.tokens" not in rows["lora_r4"] and "continuation.meteor_reason" not in rows["lora_r4"]

    md = (out / "report.md").read_text()
    lora_line = next(line for line in md.splitlines() if line.startswith("| LoRA r4 | lora_r4 |"))  # the method as labelled
    assert f"{lora['trainable_params']:,} ({100 * lora['trainable_params'] / lora['total_params']:.3g}%)" in lora_line
    assert f"{lora['best_val_loss']:.4f}" in lora_line and f"{lora['tokens_per_s']:.0f}" in lora_line
    assert "| 370 |" in lora_line

    data = json.loads((out / "report.json").read_text())
    assert {r["name"]: r["best_val_loss"] for r in data["rows"]}["lora_r4"] == lora["best_val_loss"]
    assert data["quality_in_pareto"] == "ppl.ppl"


def test_seeds_of_one_recipe_give_mean_and_std(runs):
    base, out = runs
    full = csv_rows(out)["full"]
    assert full["status"] == "2 seeds" and full["runs"] == "full-seed1 full-seed2"
    losses = [summary(base, f"full-seed{s}")["best_train_loss"] for s in (1, 2)]
    assert float(full["best_train_loss"]) == pytest.approx(statistics.fmean(losses))
    assert float(full["best_train_loss_std"]) == pytest.approx(statistics.stdev(losses))
    assert float(full["ppl.ppl"]) == 385.0 and float(full["ppl.ppl_std"]) == pytest.approx(statistics.stdev([390, 380]))
    md = (out / "report.md").read_text()
    assert f"{statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f}" in md
    assert "mean ± sample standard deviation" in md


def test_failed_and_unfinished_runs_show_as_failed_with_their_error(runs):
    _, out = runs
    rows = csv_rows(out)
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["error"] == "error: data file 'nowhere.txt' does not exist"
    assert rows["lora_unfinished"]["status"] == "failed" and "stops at step 4" in rows["lora_unfinished"]["error"]
    md = (out / "report.md").read_text()
    assert "- **broken**: error: data file 'nowhere.txt' does not exist" in md
    assert "| LoRA r4 | lora_unfinished | failed |" in md  # labelled from its recipe.yaml


def test_setting_is_printed_under_the_table(runs, assets):
    base, out = runs
    md = (out / "report.md").read_text()
    setting = md.split("## Setting", 1)[1]
    lora = summary(base, "lora_r4")
    assert f"- **model**: {assets / 'gpt2'}" in setting
    assert "- **sequence length**: 32" in setting
    assert "- **optimizer steps**: 4" in setting
    assert f"torch {lora['versions']['torch']}" in setting
    assert f"{lora['hardware']['cpu_cores']} cores" in setting
    assert "- **evaluation ppl**: max_length 128, stride 64, tokens 2048" in setting
    assert "- **seed** (differs between runs):" in setting  # seeds 1, 2 and the recipe's 42


def test_plots_are_png_images(runs):
    _, out = runs
    for name in ("loss_curves.png", "pareto.png"):
        path = out / name
        assert path.read_bytes()[:8] == PNG_MAGIC
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for argv, expected in [
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "does not exist"),
        ([str(tmp_path), "--out", str(tmp_path / "r")], "is not a run folder"),
        ([], "the following arguments are required"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            report.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_run_trained_but_not_evaluated_shows_its_evaluation_error(runs, tmp_path):
    base, _ = runs
    run = tmp_path / "lora_noeval"
    shutil.copytree(base / "lora_r4", run)
    (run / "eval.json").unlink()
    (run / "error.txt").write_text("evaluation failed with exit status 2: python evaluate.py --run ...\n"
                                   "error: data file 'gone.txt' does not exist\n")
    report.main([str(run), "--out", str(tmp_path / "r")])
    row = csv_rows(tmp_path / "r")["lora_noeval"]
    assert row["status"] == "finished" and row["best_val_loss"] != ""
    assert row["error"] == "evaluation failed: error: data file 'gone.txt' does not exist"


def test_evaluate_py_report_writes_the_report(runs, tmp_path):
    base, _ = runs
    result = run_script("evaluate.py", "report", base / "lora_r4", base / "baseline", "--out", tmp_path / "r")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "r" / "report.md")
    assert list(csv_rows(tmp_path / "r")) == ["lora_r4", "baseline"]
