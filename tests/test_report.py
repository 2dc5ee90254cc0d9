"""tunebench.report on real run folders written by train.py (tiny GPT-2, a few steps): the table holds
the runs' own numbers, seeds aggregate to mean ± std, a failed or unfinished run shows as failed while
the others still report, and the plots are real PNG images."""
import base64
import csv
import html.parser
import json
import math
import os
import shutil
import statistics
import subprocess
import sys

import matplotlib.image
import pytest

from conftest import ROOT, run_script
from tunebench import report, report_generations, report_rows

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
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "summary.json").write_text(json.dumps({"name": "damaged", "method": "baseline"}))
    (damaged / "generations.jsonl").write_text('{"task": "instruction", "id": 0}\n{"task": "instr')  # cut short
    for argv, expected in [
        ([str(tmp_path / "missing"), "--out", str(tmp_path / "r")], "does not exist"),
        ([str(damaged), "--out", str(tmp_path / "r")], "generations.jsonl', line 2 is not valid JSON"),
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


def generations_of(folder) -> dict:
    return {(g["prompt"], g["reference"]): g["output"] for g in map(json.loads, (folder / "generations.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def evaluated(runs, assets, tmp_path_factory):
    """Real generations: evaluate.py on the baseline and two trained runs (copies), then their report."""
    from test_evaluate import evaluate, generation_data

    base, _ = runs
    tmp_path = tmp_path_factory.mktemp("generations")
    data_file = generation_data(tmp_path / "g.jsonl")
    task_args = ["--tasks", "instruction", "--data-file", data_file, "--max-new-tokens", 10]
    evaluate("--model", assets / "gpt2", "--out", tmp_path / "baseline", *task_args)
    for name in ("full-seed1", "lora_r4"):
        shutil.copytree(base / name, tmp_path / name, ignore=shutil.ignore_patterns("eval.json", "checkpoints"))
        evaluate("--run", tmp_path / name, *task_args)
    folders = [tmp_path / n for n in ("baseline", "full-seed1", "lora_r4")]
    report.main([str(f) for f in folders] + ["--out", str(tmp_path / "report")])
    return folders, data_file, tmp_path / "report"


def test_generations_side_by_side(evaluated):
    """The report shows the same handful of prompts for every model, chosen by the evaluation seed, with
    each model's own output."""
    folders, data_file, out = evaluated
    view = json.loads((out / "report.json").read_text())["generations"]
    assert view["task"] == "instruction" and view["seed"] == 42 and view["prompts"] == 6
    assert len(view["examples"]) == report_generations.GENERATION_EXAMPLES  # 5 of the 6
    references = [json.loads(line)["output"].strip() for line in data_file.read_text().splitlines()]
    md = (out / "report.md").read_text()
    section = md.split("## Generations side by side")[1].split("## Setting")[0]
    for example in view["examples"]:
        assert example["reference"] == references[example["id"]]
        assert list(example["outputs"]) == ["baseline", "full-seed1", "lora_r4"]
        for folder in folders:
            output = generations_of(folder)[(example["prompt"], example["reference"])]
            assert example["outputs"][folder.name] == output
            assert output in section
    assert section.count("**Reference**") == 5 and section.count("**lora_r4**") == 5
    # Every example's ROUGE-L and chrF are kept, and each method's difference from the untrained model on the
    # same examples has a paired interval in the report.
    items = json.loads((folders[2] / "eval.json").read_text())["items"]["instruction"]
    rouge = [g["output"] for g in map(json.loads, (folders[2] / "generations.jsonl").read_text().splitlines())]
    assert len(items["rougeL"]) == len(items["chrf"]) == len(rouge) == 6
    scores = md.split("## Generation scores against the untrained model")[1].split("##")[0]
    assert "same 6 examples" in scores and scores.count("| lora_r4 |") == 1 and "[" in scores
    # Another evaluation seed picks another handful, the same for every model.
    assert report_generations.side_by_side([dict(report_rows.load_run(f), eval_seed=7) for f in folders])["examples"] != view["examples"]


def test_gains_have_paired_intervals_over_the_test_windows_and_ties_share_a_rank(runs, assets, tmp_path):
    """evaluate.py keeps every window's loss; the report gives each gain a 95% interval from a paired bootstrap
    over those windows, ranks only differences whose interval excludes zero, and says so."""
    from test_evaluate import evaluate

    base, _ = runs
    task_args = ["--tasks", "ppl", "--data-file", assets / "valid.txt", "--max-length", 32, "--stride", 32]
    evaluate("--model", assets / "gpt2", "--out", tmp_path / "baseline", *task_args)
    for name in ("full-seed1", "lora_r4"):
        shutil.copytree(base / name, tmp_path / name, ignore=shutil.ignore_patterns("eval.json", "checkpoints"))
        evaluate("--run", tmp_path / name, *task_args)
    evaluation = json.loads((tmp_path / "lora_r4" / "eval.json").read_text())
    items, ppl = evaluation["items"]["ppl"], evaluation["tasks"]["ppl"]
    assert items["unit"] == "window" and len(items["nll"]) == ppl["windows"] > 10 and sum(items["tokens"]) == ppl["tokens"]
    assert math.exp(math.fsum(items["nll"]) / sum(items["tokens"])) == pytest.approx(ppl["ppl"], rel=1e-9)

    report.main([str(tmp_path / n) for n in ("baseline", "full-seed1", "lora_r4")] + ["--out", str(tmp_path / "report")])
    rows = csv_rows(tmp_path / "report")
    for name in ("full-seed1", "lora_r4"):
        gain, low, high = (float(rows[name][k]) for k in ("gain", "gain_low", "gain_high"))
        assert low <= gain <= high and rows[name]["rank"] in ("1", "2")
    md = (tmp_path / "report").joinpath("report.md").read_text()
    assert f"paired bootstrap over the {ppl['windows']} test items" in md and "## Noise" in md
    ranks = {rows[n]["rank"] for n in ("full-seed1", "lora_r4")}
    verdict_line = next(line for line in md.splitlines() if line.startswith("| full-seed1 − lora_r4 |"))
    # Two ranks exactly when the pair's interval excludes zero; otherwise a tie, both first.
    assert (ranks == {"1", "2"}) == ("beyond noise" in verdict_line)


# ---- report.html in a real browser ------------------------------------------------------------------------

def chromium() -> str:
    """Debian's chromium (.ci/run and `make test` install it as root); CI fails without it, elsewhere the test skips."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def open_in_browser(page, tmp_path, screenshot=None) -> tuple:
    """Headless Chromium opens the page offline (every host name unresolvable): (its DOM after loading,
    the console messages it logged: CSP violations, failed loads, script errors)."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'chromium-profile'}", "--host-resolver-rules=MAP * ~NOTFOUND",
             "--enable-logging=stderr", "--log-level=0", "--hide-scrollbars", "--window-size=1400,2600"]
    runs = [["--dump-dom"]] + ([[f"--screenshot={screenshot}"]] if screenshot else [])
    dom, console = "", []
    for extra in runs:
        result = subprocess.run(flags + extra + [page.as_uri()], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        dom = dom or result.stdout
        console += [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return dom, console


class PageParts(html.parser.HTMLParser):
    """What a reader sees: headings in order, tables, images, links, the side-by-side blocks."""

    def __init__(self):
        super().__init__()
        self.headings, self.tables, self.images, self.links, self.prompts, self.cards = [], 0, [], [], 0, []
        self._heading = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "h2":
            self._heading = ""
        elif tag == "table":
            self.tables += 1
        elif tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag in ("a", "link", "script", "iframe"):
            self.links.append((tag, attrs))
        elif tag == "div" and attrs.get("class") == "prompt":
            self.prompts += 1
        elif tag == "div" and (attrs.get("class") or "").startswith("answer"):
            self.cards.append(attrs["class"])

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data

    def handle_endtag(self, tag):
        if tag == "h2" and self._heading is not None:
            self.headings.append(self._heading.strip())
            self._heading = None


def test_report_page_opens_offline_in_chromium(evaluated, tmp_path):
    _, _, out = evaluated
    page = out / "report.html"
    shot = tmp_path / "report.png"
    dom, console = open_in_browser(page, tmp_path, screenshot=shot)
    assert console == []  # no blocked load, no failed resource, no script error
    parts = PageParts()
    parts.feed(dom)
    # The recommendation and the table first, then the plots, then the generations side by side.
    assert parts.headings[:4] == ["Recommendation", "Results", "Plots", "Generations side by side"]
    assert "Setting" in parts.headings and "Plots" not in parts.headings[4:]
    assert parts.tables >= 2  # the recommendation's budget table and the results table
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(parts.images) == len(pngs) == 2  # every plot, embedded
    for src in parts.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.partition(",")[2]).startswith(PNG_MAGIC)
    assert parts.links == []  # nothing to fetch, nothing to run
    assert parts.prompts == report_generations.GENERATION_EXAMPLES
    assert parts.cards == ["answer reference", "answer", "answer", "answer"] * report_generations.GENERATION_EXAMPLES
    # The screenshot is a real rendering: a page-sized image with text and plots on it, not a blank one.
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (2600, 1400) and image[..., :3].std() > 0.05

    # The checks can fail: a page that loads from the network or runs a script is caught.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("<h1>", '<img src="http://example.com/x.png"><script>go()</script><h1>', 1))
    _, console = open_in_browser(broken, tmp_path)
    assert len(console) == 2 and "example.com/x.png" in console[0] and "script" in console[1]
