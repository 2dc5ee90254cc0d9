"""The report's check of a suite's plan: what `compare --plan` predicted (plan.json, tunebench/forecast.py)
beside what the suite took, per step and for the whole suite: time from the suite's timings.jsonl (the last
time of each step, every invocation of the suite added up), peak memory per process from each run's summary.json."""
from pathlib import Path

from tunebench import rundir

PLAN_FILE = "plan.json"  # in the suite's runs folder


def measured_peak(run_dir: Path):
    try:
        summary = rundir.read_json(run_dir / "summary.json")
    except (OSError, ValueError):
        return None
    return summary.get("peak_gpu_mem_mb") if summary.get("peak_gpu_mem_mb") is not None else summary.get("peak_cpu_rss_mb")


def check(runs_dir) -> dict:
    """{"rows": [...], "total": {...}} of predicted against measured, or None without a plan or timings."""
    runs_dir = Path(runs_dir)
    try:
        plan = rundir.read_json(runs_dir / PLAN_FILE)
    except (OSError, ValueError):
        return None
    timings = rundir.read_timings(runs_dir)
    if rundir.SUITE not in timings:
        return None
    rows, planned = [], set()
    for row in plan["rows"]:
        entry = {"step": row["row"] + (" (evaluated by the plan)" if row.get("done") else ""), "kind": row["kind"],
                 "reused": bool(row.get("adopted"))}
        for what in ("train", "eval"):
            name = row.get(f"{what}_step")
            if name is None:
                continue
            planned.add(name)
            entry[f"{what}_predicted_s"] = row.get(f"{what}_s")
            entry[f"{what}_measured_s"] = 0.0 if what == "train" and row.get("adopted") else timings.get(name)
        if row["kind"] == "run":
            entry.update(peak_predicted_mb=row.get("peak_mb"), peak_measured_mb=measured_peak(runs_dir / row["row"]))
        rows.append(entry)
    for name, seconds in timings.items():  # steps the plan did not foresee: rates added past an edge, retries
        if name not in planned and name != rundir.SUITE:
            rows.append({"step": f"{name} (not planned)", "kind": "trial" if name.startswith("search ") else "other",
                         "train_predicted_s": 0.0, "train_measured_s": seconds})
    search = [sum(r.get(f"train_{k}_s") or 0 for r in rows if r["kind"] == "trial") for k in ("predicted", "measured")]
    loads = [r.get("load_average") for r in rundir.read_log(runs_dir / rundir.TIMINGS_FILE) if r.get("step") == rundir.SUITE]
    total = {"predicted_s": plan["total_s"], "measured_s": timings[rundir.SUITE], "search_predicted_s": search[0],
             "search_measured_s": search[1], "calibration_s": plan["calibration_s"],
             "plan_load_average": plan.get("load_average"), "suite_load_average": loads[-1] if loads else None}
    return {"rows": rows, "total": total}


def load_text(total: dict) -> str:
    """The machine's load when planned and when the suite ended: on shared cores, the first reason for a gap."""
    if total["plan_load_average"] is None or total["suite_load_average"] is None:
        return ""
    def three(loads):
        return " / ".join(f"{x:.2f}" for x in (loads if isinstance(loads, list) else [loads]))

    return (f"; the load averages (1 / 5 / 15 min) were {three(total['plan_load_average'])} when planned and "
            f"{three(total['suite_load_average'])} when the suite ended")


def ratio(predicted, measured) -> str:
    if predicted is None or measured is None:
        return "—"
    return f"{100 * (predicted - measured) / measured:+.0f}%" if measured else "—"


def seconds(value) -> str:
    return "—" if value is None else f"{value:,.1f}"


def lines(runs_dir) -> list:
    """report.md's section, [] when the suite was not planned with --plan (or has not run since)."""
    found = check(runs_dir)
    if found is None:
        return []
    total = found["total"]
    out = [f"`compare --plan` predicted {total['predicted_s']:,.0f} s for the suite; it took {total['measured_s']:,.0f} s "
           f"({ratio(total['predicted_s'], total['measured_s'])}), the search {total['search_predicted_s']:,.0f} s "
           f"predicted, {total['search_measured_s']:,.0f} s measured ({ratio(total['search_predicted_s'], total['search_measured_s'])}). "
           f"The plan's calibration took {total['calibration_s']:,.0f} s{load_text(total)}. Time is wall time per step of the suite "
           "(start-up, model load, validation and saves included); the suite's total is up to this report. Peak memory "
           "per process in MiB, as the results table measures it. Error: predicted minus measured, over measured.", "",
           "| step | train s predicted | measured | error | eval s predicted | measured | error | peak predicted | measured | error |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in found["rows"]:
        cells = ["reused", "reused", "—"] if r.get("reused") else []
        for what in ("eval",) if r.get("reused") else ("train", "eval"):
            p, m = r.get(f"{what}_predicted_s"), r.get(f"{what}_measured_s")
            cells += [seconds(p), seconds(m), ratio(p, m)]
        p, m = r.get("peak_predicted_mb"), r.get("peak_measured_mb")
        cells += [seconds(p), seconds(m), ratio(p, m)]
        out.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return out
