"""What the numbers of a comparison mean: learning and forgetting against the untrained model, which
differences exceed seed noise, and the recommendation for each budget (tunebench/report.py prints them).

- Learning: the gain on the target, in nats per token: ln(ppl untrained) - ln(ppl run) on the suite's
  perplexity task, else (no perplexity task) the run's own validation loss at step 0 minus its best.
- Forgetting: ln(ppl run) - ln(ppl untrained) on the general text (eval.json task `general`): positive
  means the run got worse there. Both are differences of mean log-likelihood, so they compare across
  texts and models, and "share of full fine-tuning's gain" is gain / gain of full.
- Noise: rows trained with the same several seeds are compared seed by seed (a paired t-test on the gain,
  two-sided 95%): a difference is "beyond noise" only when its 95% interval excludes zero. With one seed
  nothing is known about noise, and the report says so instead of ranking silently.
"""
import math
import re
import statistics

GENERAL = "general"
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96).
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
SEED_SUFFIX = re.compile(r"-seed\d+$")  # runs of one recipe over the suite's seeds: NAME-seedN
BUDGETS = [  # (row key, what, unit)
    ("peak_mem_mb", "peak memory", "MB"),
    ("train_time_s", "training time", "s"),
    ("artifact_mb", "artifact size", "MB"),
]


def t95(df: int) -> float:
    return T95[df - 1] if df <= len(T95) else 1.96


def _ppl(run: dict, task: str):
    value = (run["eval"].get(task) or {}).get("ppl")
    return value if isinstance(value, (int, float)) and value > 0 else None


def target_task(runs: list):
    """The perplexity task the gain is measured on: the first one every trained run has, else None."""
    trained = [r for r in runs if r["finished"] and r["method"] != "baseline"]
    tasks = list(dict.fromkeys(t for r in trained for t in r["eval"] if t != GENERAL))
    return next((t for t in tasks if trained and all(_ppl(r, t) for r in trained)), None)


def baseline_for(run: dict, baselines: list):
    """The untrained model's run of this run's base model (the only one when the suite has one model)."""
    if len(baselines) == 1:
        return baselines[0]
    model = run["summary"].get("model")
    return next((b for b in baselines if b["summary"].get("model") in (model, None)), None)


def learning_and_forgetting(runs: list) -> dict:
    """run name -> {gain, forgetting}: nats per token against the untrained model (None where unknown)."""
    baselines = [r for r in runs if r["finished"] and r["method"] == "baseline"]
    task = target_task(runs)
    out = {}
    for run in runs:
        if not run["finished"] or run["method"] == "baseline":
            continue
        base = baseline_for(run, baselines)
        gain = forgetting = None
        if task and base and _ppl(base, task):
            gain = math.log(_ppl(base, task)) - math.log(_ppl(run, task))
        elif task is None and run["summary"].get("initial_val_loss") is not None and run["summary"].get("best_val_loss") is not None:
            gain = run["summary"]["initial_val_loss"] - run["summary"]["best_val_loss"]
        if base and _ppl(base, GENERAL) and _ppl(run, GENERAL):
            forgetting = math.log(_ppl(run, GENERAL)) - math.log(_ppl(base, GENERAL))
        out[run["name"]] = {"gain": gain, "forgetting": forgetting}
    return out


def gain_source(runs: list) -> str:
    task = target_task(runs)
    if task:
        return f"ln(perplexity) on {'the suite text' if task == 'ppl' else task}, untrained minus trained"
    return "validation loss, at step 0 minus best"


# ---- noise -----------------------------------------------------------------------------------------------

def per_seed(row: dict, values: dict, key: str) -> dict:
    """seed -> value of `key` for the runs of a row (a run without a -seedN suffix has seed None)."""
    out = {}
    for name in row["runs"]:
        match = SEED_SUFFIX.search(name)
        value = (values.get(name) or {}).get(key)
        if value is not None:
            out[int(match.group()[5:]) if match else None] = value
    return out


def compare_pair(a: dict, b: dict, values: dict) -> dict:
    """Paired difference of the gain, a minus b, over the seeds both rows have: mean, 95% interval, verdict."""
    ga, gb = per_seed(a, values, "gain"), per_seed(b, values, "gain")
    seeds = sorted(s for s in ga.keys() & gb.keys() if s is not None)
    if len(seeds) < 2:
        diff = (statistics.fmean(ga.values()) - statistics.fmean(gb.values())) if ga and gb else None
        return {"diff": diff, "n": len(seeds), "low": None, "high": None, "beyond_noise": None}
    diffs = [ga[s] - gb[s] for s in seeds]
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    half = t95(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"diff": mean, "n": len(seeds), "low": mean - half, "high": mean + half,
            "beyond_noise": mean - half > 0 or mean + half < 0}


def tiers(ranked_rows: list, values: dict) -> list:
    """Rows best first, grouped: a row joins the tier above when its gain is not beyond noise from the
    tier's best (or noise is unknown and the gains are equal)."""
    groups = []
    for row in ranked_rows:
        if groups:
            verdict = compare_pair(groups[-1][0], row, values)
            if verdict["beyond_noise"] is False:
                groups[-1].append(row)
                continue
        groups.append([row])
    return groups


# ---- the recommendation ------------------------------------------------------------------------------------

def better(a: dict, b: dict, values: dict) -> bool:
    """Whether row a learned more than row b by more than seed noise (by any margin when noise is unknown)."""
    verdict = compare_pair(a, b, values)
    if verdict["beyond_noise"] is None:
        return verdict["diff"] is not None and verdict["diff"] > 0
    return verdict["beyond_noise"] and verdict["diff"] > 0


def picks_for_budget(rows: list, key: str, values: dict) -> list:
    """[(limit, row)]: walking up the budget, the row to pick once the budget reaches `limit` (the cheapest
    row that learns more, beyond noise, than the cheaper pick)."""
    # A run that does not improve on the untrained model is never a pick: training it buys nothing.
    candidates = sorted((r for r in rows if r.get(key) is not None and r.get("gain") is not None and r["gain"] > 0),
                        key=lambda r: r[key])
    picks = []
    for row in candidates:
        if not picks or better(row, picks[-1][1], values):
            picks.append((row[key], row))
    return picks


def full_row(rows: list):
    return next((r for r in rows if r["method"] == "full" and r.get("gain") is not None), None)


def share_of_full(row: dict, rows: list):
    full = full_row(rows)
    if full is None or not full["gain"] or full["gain"] <= 0 or row.get("gain") is None:
        return None
    return row["gain"] / full["gain"]


def caveats(row: dict, rows: list, values: dict, search: dict, seeded: bool) -> list:
    out = []
    method = (search or {}).get("methods", {}).get(row.get("recipe", row["name"]))
    if search is None:
        out.append("rate not tuned (the recipe's own)")
    elif method:
        if method.get("edge"):
            out.append(f"rate at the {method['edge']} edge of the rates tried: see the warning above")
        if small_search(search):
            out.append(f"small tuning budget ({search['rates_per_method']} rates, at most {search['rungs'][-1]['steps']} steps each)")
    if not seeded:
        out.append("one seed: seed noise not measured")
    else:
        close = [r["name"] for r in rows if r is not row and r.get("gain") is not None
                 and compare_pair(row, r, values)["beyond_noise"] is False and r["gain"] >= row["gain"] - 1e-12]
        if close:
            out.append(f"within seed noise of {', '.join(close)}")
    return out


def edge_warnings(search) -> list:
    """A line per method whose best rate is still the lowest or highest tried after the rates added past that
    edge: its row may understate it. The report puts these first."""
    lines = []
    for name, method in ((search or {}).get("methods") or {}).items():
        if method.get("edge"):
            added = (f"even after {len(method['extension_rates'])} rate(s) added past it" if search["extend"]
                     else "and the search added none past it (search `extend: 0`)")
            lines.append(f"**Warning: {name}'s best rate, {method['best_lr']:g}, is the {method['edge']} of the rates tried "
                         f"({_rates(method['rates'])}), {added}: its best rate may lie beyond, and its row may understate "
                         f"it.**")
    return lines


def small_search(search: dict) -> bool:
    return search["rates_per_method"] < 5 or search["rungs"][-1]["steps"] < 200


def _rates(rates: list) -> str:
    return ", ".join(f"{r:g}" for r in rates)


def _amount(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.3g} {unit}"


def describe(row: dict, rows: list) -> str:
    parts = [f"gain {row['gain']:+.3f} nats/token" + (" (no better than untrained)" if row["gain"] <= 0 else "")]
    share = share_of_full(row, rows)
    if share is not None and row["method"] != "full":
        parts.append(f"{100 * share:.0f}% of full fine-tuning's gain")
    if row.get("forgetting") is not None:
        parts.append(f"forgetting {row['forgetting']:+.3f} nats/token on the general text")
    return ", ".join(parts)


def recommendation(rows: list, values: dict, search, seeded: bool, memory: str = "peak memory") -> list:
    """Markdown lines: the best overall, then for each budget the pick at each level, with caveats."""
    trained = [r for r in rows if r["status"] != "failed" and r["method"] != "baseline" and r.get("gain") is not None]
    if not trained:
        return ["No trained run finished with a quality to compare; see Failed below."]
    ranked = sorted(trained, key=lambda r: -r["gain"])
    top = tiers(ranked, values)[0]
    lines = []
    if len(top) > 1:
        lines.append(f"**Best learning: {', '.join(r['name'] for r in top)}**, within seed noise of each other "
                     f"(paired t-test over seeds, 95%); {describe(top[0], rows)} for {top[0]['name']}.")
    else:
        lines.append(f"**Best learning: {top[0]['name']}** ({describe(top[0], rows)}).")
    lines += ["", "| if your budget is | pick | trained at lr | what it gives | caveats |", "|---|---|---:|---|---|"]
    for key, what, unit in BUDGETS:
        what = memory if key == "peak_mem_mb" else what
        picks = picks_for_budget(trained, key, values)
        for i, (limit, row) in enumerate(picks):
            upper = f" (below {_amount(picks[i + 1][0], unit)})" if i + 1 < len(picks) else " or more"
            notes = caveats(row, trained, values, search, seeded)
            lr = f"{row['lr']:.3g}" if row.get("lr") is not None else "—"
            lines.append(f"| {what} {_amount(limit, unit)}{upper} | **{row['name']}** | {lr} | {describe(row, rows)} | "
                         f"{'; '.join(notes) or '—'} |")
    useless = [r["name"] for r in trained if r["gain"] <= 0]
    if useless:
        lines += ["", f"Not recommended at any budget: {', '.join(useless)} (no better than the untrained model on the target)."]
    lines.append("")
    lines.append("Each budget line names the cheapest run that learns more than every cheaper one"
                 + (" by more than seed noise." if seeded else " (one seed: by any margin, noise unknown)."))
    return lines


def noise_lines(rows: list, values: dict, seeded: bool) -> list:
    trained = sorted((r for r in rows if r["status"] != "failed" and r["method"] != "baseline" and r.get("gain") is not None),
                     key=lambda r: -r["gain"])
    if not seeded:
        return ["Every method ran once (one seed), so seed noise is not measured: a small difference below may be "
                "noise. Add `seeds: [1, 2, 3]` to the suite to test it."]
    lines = ["Gain differences between neighbours in the ranking, seed by seed (paired t-test over the seeds both "
             "rows share, two-sided 95% interval of the mean difference):", "",
             "| pair | gain difference (nats/token) | 95% interval | seeds | verdict |", "|---|---:|---|---:|---|"]
    for a, b in zip(trained, trained[1:]):
        v = compare_pair(a, b, values)
        interval = f"[{v['low']:+.4f}, {v['high']:+.4f}]" if v["low"] is not None else "—"
        verdict = {True: "beyond noise", False: "within noise: not ranked", None: "too few shared seeds"}[v["beyond_noise"]]
        lines.append(f"| {a['name']} − {b['name']} | {v['diff']:+.4f} | {interval} | {v['n']} | {verdict} |")
    groups = tiers(trained, values)
    lines += ["", "Ranking (methods in one bracket are not told apart): "
              + " > ".join("[" + ", ".join(r["name"] for r in g) + "]" for g in groups)]
    return lines
