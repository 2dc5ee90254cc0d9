"""Runs -> one comparison: report.md, report.html (the same, self-contained, with the plots and the generations
side by side: tunebench/report_html.py), report.csv, report.json, loss_curves.png, pareto.png, and with
what a suite adds: lr_sweep.png (its learning-rate search), learning_forgetting.png (a general text),
grid.png (grids over recipe keys).

    python evaluate.py report runs/A runs/B ... --out reports/NAME [--search runs/SUITE/search]

report.md opens with the recommendation (tunebench/verdict.py): for each budget, the method to pick.

A row per method. Runs whose folder names differ only by a `-seedN` suffix (full-seed1,
full-seed2) are one recipe trained with several seeds: their row holds the mean and the sample
standard deviation (mean ± std). A run without summary.json did not finish: it shows as failed
with its error (error.txt, written by the compare driver, or the last step of its log), and the
other runs still report. Numbers are copied from summary.json and eval.json, never recomputed.

The parts, each in its module: the runs read into rows (tunebench/report_rows.py), the plots
(tunebench/report_plots.py), the generations side by side (tunebench/report_generations.py) and
report.html (tunebench/report_html.py). This one writes report.md, report.csv and report.json.
"""
import csv
import io
import json
import math
from pathlib import Path

from tunebench import inputs, report_forecast, report_generations, report_html, report_plots, report_rows, verdict
from tunebench.errors import ArgumentParser, UserError, command
from tunebench.rundir import write_atomic, write_json


# ---- the table ---------------------------------------------------------------------------------------

def _format(value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "params":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{value:.3g}%"
    if kind in ("mb", "seconds"):
        return f"{value:.1f}"
    if kind == "rate":
        return f"{value:.0f}"
    if kind == "loss":
        return f"{value:.4f}"
    if kind == "lr":
        return f"{value:.3g}"
    if kind == "nats":
        return f"{value:+.4f}"
    if kind == "rank":
        return f"{value:d}"
    return f"{value:.4g}"


def _cell(row: dict, key: str, kind: str) -> str:
    text = _format(row.get(key), kind)
    if row.get(f"{key}_low") is not None:  # an interval (gain, forgetting) says more than a standard deviation
        return f"{text} [{_format(row[f'{key}_low'], kind)}, {_format(row[f'{key}_high'], kind)}]"
    if row["std"].get(key):  # identical values across seeds (a parameter count) need no "± 0"
        text += f" ± {_format(row['std'][key], kind)}"
    return text


def markdown_table(rows: list, evals: list, derived: bool = False, forgetting_unit: str = "nats/token") -> str:
    # The general text's perplexity is its one column here (its other figures are in report.csv); an lm-eval
    # figure's standard error shares its cell.
    keys = {key for key, _, _ in report_rows.table_columns(evals, derived)}
    columns = [c for c in report_rows.table_columns(evals, derived, forgetting_unit)
               if (not c[0].startswith(verdict.GENERAL + ".") or c[0] == f"{verdict.GENERAL}.ppl")
               and not (c[0].endswith("_stderr") and c[0].removesuffix("_stderr") in keys)]
    header = ["method", "name", "status"] + [h for _, h, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(header))) + "|"]
    for row in rows:
        cells = [row["label"], row["name"], row["status"]]
        for key, _, kind in columns:
            cell = _cell(row, key, kind)
            if key == "trainable_params" and row.get("trainable_pct") is not None:
                cell += f" ({_format(row['trainable_pct'], 'pct')})"
            if row.get(f"{key}_stderr") is not None:
                cell += f" (se {_format(row[f'{key}_stderr'], kind)})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- the setting ---------------------------------------------------------------------------------------

def _setting_lines(item: str, values: dict) -> list:
    if not values:
        return []
    if len(values) == 1:
        return [f"- **{item}**: {next(iter(values))}"]
    lines = [f"- **{item}** (differs between runs):"]
    lines += [f"  - {value}: {', '.join(names)}" for value, names in values.items()]
    return lines


def setting_markdown(s: dict) -> str:
    lines = []
    for item, values in s.items():
        if item == "evaluation":
            for task, task_values in values.items():
                lines += _setting_lines(f"evaluation {task}", task_values)
        else:
            lines += _setting_lines(item, values)
    return "\n".join(lines)


# ---- writing -----------------------------------------------------------------------------------------

def search_lines(search: dict) -> list:
    lines = [f"Each method's learning rate was chosen on {search['metric']} by successive halving with equal effort: "
             f"{search['rates_per_method']} rates per method; every rate trains {search['rungs'][0]['steps']} steps, then "
             + ", then ".join(f"the best {r['rates']} to step {r['steps']}" for r in search["rungs"][1:])
             + f" ({search['tuning_steps_per_method']} optimizer steps per method; seed {search['seed']}"
             + (f"; trial settings {', '.join(f'{k}={v}' for k, v in search['trial_overrides'].items())}" if search["trial_overrides"] else "")
             + f"). A best rate at the edge of the rates tried got up to {search['extend']} more rate(s) past that edge, "
             f"each through the same rungs; tuning tokens count every rate tried. Study: {search['storage']}.", "",
             "| method | recipe's rate | rates tried | chosen rate | its " + search["metric"] + " | added past an edge | tuning tokens | note |",
             "|---|---:|---|---:|---:|---|---:|---|"]
    for name, m in search["methods"].items():
        note = m.get("error") or (f"still at the {m['edge']} edge of the rates tried" if m.get("edge") else "")
        best = f"{m['best_lr']:.3g}" if m.get("best_lr") is not None else "—"
        value = f"{m['best_value']:.4f}" if m.get("best_value") is not None and math.isfinite(m["best_value"]) else "—"
        diverged = [f"{t['lr']:.3g}" for t in m["trials"] if t["diverged"] and t["rung"] == 0]
        if diverged:
            note = "; ".join(filter(None, [note, f"diverged at {', '.join(diverged)}"]))
        added = ", ".join(f"{r:.3g}" for r in m["extension_rates"]) or "—"
        lines.append(f"| {name} | {m['recipe_lr']:.3g} | {', '.join(f'{r:.3g}' for r in m['rates'])} | {best} | {value} | "
                     f"{added} | {m['tuning_tokens']:,} | {note or '—'} |")
    return lines


def write_report(run_dirs: list, out: Path, search_dir=None, grid: dict = None, packing: str = None, plan_dir=None) -> Path:
    """packing: how a suite made packing the same for every run (tunebench.compare), for the setting;
    plan_dir: a suite's runs folder, whose plan.json (compare --plan) is set beside the time and memory measured."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [report_rows.load_run(d) for d in run_dirs]
    evals = report_rows.eval_columns(runs)
    derived = verdict.learning_and_forgetting(runs)
    has_derived = any(v["gain"] is not None for v in derived.values())
    rows = report_rows.build_rows(runs, evals, derived)
    report_rows.add_intervals(rows, derived)
    use_gpu = any(r.get("peak_gpu_mem_mb") is not None for r in rows)
    for row in rows:
        row["peak_mem_mb"] = row.get("peak_gpu_mem_mb" if use_gpu else "peak_cpu_rss_mb")
        row["recipe"] = report_rows.group_key(row["name"])  # its search entry (a recipe, or a recipe at a grid point)
    search = (report_rows.read_optional_json(Path(search_dir) / "search.json", "; delete it and run the suite again")
              if search_dir else None)
    seeded = any(len(r["runs"]) > 1 for r in rows if r["status"] != "failed")
    out.mkdir(parents=True, exist_ok=True)

    report_plots.plot_loss_curves(runs, out / "loss_curves.png")
    q_key, q_label = report_plots.plot_pareto(rows, evals, out / "pareto.png")
    plots = ["- `loss_curves.png`: train and validation loss of every run against training tokens.",
             f"- `pareto.png`: {q_label} against trainable parameters, peak memory and training time; "
             "the dashed line is the model before training, the grey steps the Pareto front."]
    the_setting = report_rows.setting(runs)
    if packing:
        the_setting["packing"] = {packing: [r["name"] for r in runs if r["finished"] and r["method"] != "baseline"]}
    flat = report_rows.flat_rows(rows, evals, has_derived)

    memory = "peak GPU memory" if use_gpu else "peak CPU memory (RSS)"
    warnings = verdict.edge_warnings(search)
    md = [f"# Comparison of {len(runs)} runs", "", "## Recommendation", "", *(line for w in warnings for line in (w, "")),
          *verdict.recommendation(rows, derived, search, seeded, memory), "",
          f"Gain: {verdict.gain_source(runs)}, in nats per token; forgetting: {verdict.forgetting_source(runs)}.", "",
          "## Results", "", markdown_table(rows, evals, has_derived, verdict.forgetting_unit(runs)), ""]
    md.append("Trainable params in parentheses: share of all parameters (tied weights counted once). "
              "Memory and sizes in MiB; train time excludes validation and start-up. lr: the rate the run trained at. "
              "— : not measured for that row.")
    if any(r["std"] for r in rows):
        md.append("Rows with several seeds (runs named NAME-seedN) show mean ± sample standard deviation.")
    if has_derived:
        md += ["", "## Noise", "", *verdict.noise_lines(rows, derived, seeded)]
    scores = verdict.score_lines(runs, rows)
    if scores:
        md += ["", "## Generation scores against the untrained model", "", *scores]
    if search:
        report_plots.plot_lr_sweep(search, out / "lr_sweep.png")
        plots.append("- `lr_sweep.png`: the search's validation metric against the learning rate, per method and rung; "
                     "circled: the rate chosen, dotted: the recipe's own.")
        md += ["", "## Learning-rate search", "", *search_lines(search)]
    if any(r.get("forgetting") is not None for r in rows):
        report_plots.plot_learning_forgetting(rows, out / "learning_forgetting.png", verdict.gain_source(runs),
                                              verdict.forgetting_source(runs))
        plots.append(f"- `learning_forgetting.png`: gain on the target against forgetting ({verdict.forgetting_source(runs)}), per method.")
    grid_data = None
    if grid and grid.get("keys"):
        grid_data = report_rows.grid_points_by_key(rows, runs, grid, q_key)
        report_plots.plot_grid(grid_data, q_label, out / "grid.png")
        plots.append("- `grid.png`: the metric against each swept key, one line per method.")
        md += ["", "## Grid", "", f"{q_label} at each value of each swept key (other swept keys averaged):", ""]
        for key, methods in grid_data.items():
            values = list(dict.fromkeys(json.dumps(v) for per in methods.values() for v, _, _ in per))
            md += [f"| {key} | " + " | ".join(json.loads(v).__repr__() if not isinstance(json.loads(v), str) else json.loads(v)
                                             for v in values) + " |", "|---|" + "---:|" * len(values)]
            for method, series in methods.items():
                cells = {json.dumps(v): f"{q:.4g}" for v, q, _ in series}
                md.append(f"| {method} | " + " | ".join(cells.get(v, "—") for v in values) + " |")
            md.append("")
    plan_check = report_forecast.lines(plan_dir) if plan_dir else []
    if plan_check:
        md += ["", "## Predicted and measured", "", *plan_check]
    failed = [r for r in rows if r["error"]]
    if failed:
        md += ["", "## Failed", ""] + [f"- **{r['name']}**: {r['error']}" for r in failed]
    view = report_generations.side_by_side(runs)
    if view:
        md += ["", "## Generations side by side", "", *report_generations.side_by_side_markdown(view)]
    md += ["", "## Setting", "", setting_markdown(the_setting), "", "## Plots", "", *plots, ""]

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(flat[0]) if flat else ["name"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    write_atomic(out / "report.csv", buffer.getvalue())
    write_json(out / "report.json", {
        "rows": flat,
        "setting": the_setting,
        "quality_in_pareto": q_key,
        "search": search,
        "grid": grid_data,
        "generations": view,
        "plan_check": report_forecast.check(plan_dir) if plan_dir else None,
        "runs": [{k: r[k] for k in ("name", "dir", "method", "finished", "error", "summary", "eval")} for r in runs],
    })
    write_atomic(out / "report.md", "\n".join(md))
    write_atomic(out / "report.html", report_html.page("\n".join(md), out, view))
    return out / "report.md"


@command
def main(argv=None):
    parser = ArgumentParser(usage_hint="evaluate.py report RUN_DIR [RUN_DIR ...] --out reports/NAME", prog="evaluate.py report", description="Aggregate run folders into one report.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, e.g. runs/full runs/lora_r16")
    parser.add_argument("--out", required=True, help="folder for report.md, report.csv, report.json and the plots")
    parser.add_argument("--search", default=None, help="a suite's search folder (runs/SUITE/search, with search.json)")
    args = parser.parse_args(argv)
    for run in args.runs:
        path = Path(run)
        if not path.is_dir():
            raise UserError(f"run folder '{run}' does not exist; give folders that train.py or evaluate.py wrote")
        if not any((path / f).exists() for f in ("summary.json", "recipe.yaml", "error.txt", "log.jsonl")):
            raise UserError(f"'{run}' is not a run folder (no summary.json, recipe.yaml, log.jsonl or error.txt)")
    if len({Path(r).name for r in args.runs}) < len(args.runs):
        raise UserError("two run folders have the same name; the report names rows by folder name")
    out = inputs.writable_folder(args.out, "--out")
    if args.search and not (Path(args.search) / "search.json").is_file():
        raise UserError(f"--search '{args.search}' has no search.json; give the search folder of a suite (runs/SUITE/search)")
    path = write_report(args.runs, out, search_dir=args.search)  # reads every run before it writes
    print(path)
    return path


if __name__ == "__main__":
    main()
