"""What the numbers of a comparison mean: learning and forgetting against the untrained model, which
differences are measured beyond noise, and the recommendation for each budget (tunebench/report.py prints them).

- Learning: the gain on the target, in nats per token: ln(ppl untrained) - ln(ppl run) on the suite's
  perplexity task, else (no perplexity task) the run's own validation loss at step 0 minus its best.
- Forgetting: ln(ppl run) - ln(ppl untrained) on the general text (eval.json task `general`): positive
  means the run got worse there. When the suite names lm-eval tasks instead (eval.json `forgetting`), it is
  the untrained model's figure minus the run's (for a figure where higher is better), averaged over those
  tasks, with a paired bootstrap over their documents. Both are differences of mean log-likelihood, so they compare across
  texts and models, and "share of full fine-tuning's gain" is gain / gain of the matching full run.
- Noise: every run is scored on the same test items (the windows of a text, the examples of a file), and
  evaluate.py keeps each item's loss (eval.json "items"). A gain, or the difference of two gains, gets a
  95% interval from a paired bootstrap over those items (the same resampled items for every run); with
  several seeds, the seeds' own 95% t-interval is combined with it (half-widths added in quadrature: the
  test items and the training seeds are independent sources of noise). A difference counts only when its
  interval excludes zero; every other pair is a tie, and ties are printed as ties.
"""
import math
import re
import statistics

import numpy as np

from tunebench.recipe import flatten

GENERAL = "general"
RESAMPLES = 2000  # bootstrap resamples: the 2.5% and 97.5% quantiles move by well under 1% of the width
BOOTSTRAP_SEED = 0  # fixed, so a report is reproduced to the digit
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond, the Cornish-Fisher expansion.
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
Z975 = 1.959964
SEED_SUFFIX = re.compile(r"-seed\d+$")  # runs of one recipe over the suite's seeds: NAME-seedN
BUDGETS = [  # (row key, what, unit)
    ("peak_mem_mb", "peak memory", "MB"),
    ("train_time_s", "training time", "s"),
    ("artifact_mb", "artifact size", "MB"),
]
# Keys that make two runs different methods rather than different settings (matching a run to its full run).
METHOD_SPECIFIC = ("method.", "train.lr", "train.optimizer", "name", "output_dir", "train.seed")


def t95(df: int) -> float:
    if df <= len(T95):
        return T95[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


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


def item_losses(run: dict, task: str):
    """(summed NLL per item, scored tokens per item) as numpy arrays, or None when eval.json has no items."""
    items = (run.get("items") or {}).get(task) or {}
    nll, tokens = items.get("nll"), items.get("tokens")
    if not nll or not tokens or len(nll) != len(tokens):
        return None
    return np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)


def _paired_items(improved: dict, reference: dict, task: str):
    """(reference NLL - improved NLL per item, tokens per item) when both were scored on the same items."""
    a, b = item_losses(improved, task), item_losses(reference, task)
    if a is None or b is None or not np.array_equal(a[1], b[1]):
        return None
    return b[0] - a[0], a[1]


def forgetting_measure(runs: list):
    """The lm-eval tasks and figure the suite measures forgetting on (eval.json `forgetting`), else None: the
    general text."""
    return next((r["forgetting"] for r in runs if r["finished"] and r.get("forgetting")), None)


def forgetting_unit(runs: list) -> str:
    measure = forgetting_measure(runs)
    return f"{measure['metric']}, lm-eval" if measure else "nats/token"


def forgetting_source(runs: list) -> str:
    measure = forgetting_measure(runs)
    if measure is None:
        return "ln(perplexity) on the general text, trained minus untrained (positive: worse than before training), in nats per token"
    tasks = ", ".join(t.split(":", 1)[1] for t in measure["tasks"])
    order = "untrained minus trained" if measure["higher_is_better"] else "trained minus untrained"
    return (f"{measure['metric']} on the lm-eval task{'s' if len(measure['tasks']) > 1 else ''} {tasks}, {order}"
            + (", averaged over the tasks" if len(measure["tasks"]) > 1 else "") + " (positive: worse than before training)")


def _harness_scores(run: dict, task: str, metric: str):
    """(the task's figure, its per-document values) from eval.json; the values only when their mean is the figure."""
    value = (run["eval"].get(task) or {}).get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None, None
    per_document = ((run.get("items") or {}).get(task) or {}).get(metric)
    if not per_document or not math.isclose(statistics.fmean(per_document), value, rel_tol=1e-9, abs_tol=1e-12):
        per_document = None
    return value, per_document


def harness_forgetting(base: dict, run: dict, measure: dict) -> tuple:
    """(forgetting, (per-document forgetting, weights)) on lm-eval tasks: each task's figure lost, averaged over
    the tasks. A document of a task of n documents weighs 1/n, so the weighted per-document values sum to that
    average (the shape of the per-item losses the bootstrap resamples); None where a figure is missing."""
    sign = 1.0 if measure["higher_is_better"] else -1.0
    losses, item_parts, weight_parts = [], [], []
    for task in measure["tasks"]:
        before, before_items = _harness_scores(base, task, measure["metric"])
        after, after_items = _harness_scores(run, task, measure["metric"])
        if before is None or after is None:
            return None, None
        losses.append(sign * (before - after))
        if before_items is not None and after_items is not None and len(before_items) == len(after_items):
            n = len(before_items)
            item_parts.append(sign * (np.asarray(before_items) - np.asarray(after_items)) / n)
            weight_parts.append(np.full(n, 1.0 / n))
    items = (np.concatenate(item_parts), np.concatenate(weight_parts)) if len(item_parts) == len(measure["tasks"]) else None
    return statistics.fmean(losses), items


def learning_and_forgetting(runs: list) -> dict:
    """run name -> {gain, forgetting} in nats per token against the untrained model (None where unknown),
    with the per-item gains behind them (gain_items, forgetting_items: (per-item nats, tokens)) and the
    run's setting (to match it with its full fine-tuning run)."""
    baselines = [r for r in runs if r["finished"] and r["method"] == "baseline"]
    task = target_task(runs)
    measure = forgetting_measure(runs)
    out = {}
    for run in runs:
        if not run["finished"] or run["method"] == "baseline":
            continue
        base = baseline_for(run, baselines)
        gain = forgetting = gain_items = forgetting_items = None
        if task and base and _ppl(base, task):
            gain = math.log(_ppl(base, task)) - math.log(_ppl(run, task))
            gain_items = _paired_items(run, base, task)
        elif task is None and run["summary"].get("initial_val_loss") is not None and run["summary"].get("best_val_loss") is not None:
            gain = run["summary"]["initial_val_loss"] - run["summary"]["best_val_loss"]
        if base and measure:
            forgetting, forgetting_items = harness_forgetting(base, run, measure)
        elif base and _ppl(base, GENERAL) and _ppl(run, GENERAL):
            forgetting = math.log(_ppl(run, GENERAL)) - math.log(_ppl(base, GENERAL))
            forgetting_items = _paired_items(base, run, GENERAL)  # trained minus untrained NLL per item
        setting = {k: v for k, v in flatten(run["recipe"] or {}).items() if not k.startswith(METHOD_SPECIFIC)}
        out[run["name"]] = {"gain": gain, "forgetting": forgetting, "gain_items": gain_items,
                            "forgetting_items": forgetting_items, "setting": setting,
                            "forgetting_words": forgetting_words(measure)}
    return out


def forgetting_words(measure) -> str:
    """How the recommendation names the forgetting figure's unit and measure."""
    if measure is None:
        return "nats/token on the general text"
    return f"{measure['metric']} on lm-eval {', '.join(t.split(':', 1)[1] for t in measure['tasks'])}"


def gain_source(runs: list) -> str:
    task = target_task(runs)
    if task:
        return f"ln(perplexity) on {'the suite text' if task == 'ppl' else task}, untrained minus trained"
    return "validation loss, at step 0 minus best"


# ---- noise: paired bootstrap over the test items, t-interval over the seeds -------------------------------

_resamples = {}


def resamples(n: int) -> np.ndarray:
    """(RESAMPLES, n) item indices drawn with replacement: the same draws for every run and pair of a report."""
    if n not in _resamples:
        _resamples[n] = np.random.default_rng(BOOTSTRAP_SEED).integers(0, n, size=(RESAMPLES, n))
    return _resamples[n]


def seed_of(name: str):
    match = SEED_SUFFIX.search(name)
    return int(match.group()[5:]) if match else None


def per_seed(row: dict, values: dict, key: str) -> dict:
    """seed -> value of `key` for the runs of a row (a run without a -seedN suffix has seed None)."""
    return {seed_of(name): values[name][key] for name in row["runs"]
            if (values.get(name) or {}).get(key) is not None}


def _mean_items(row: dict, values: dict, key: str):
    """The row's per-item values averaged over its seeds, (items, tokens); None unless every run has them."""
    found = [(values.get(name) or {}).get(f"{key}_items") for name in row["runs"]]
    if not found or any(f is None for f in found) or any(not np.array_equal(f[1], found[0][1]) for f in found):
        return None
    return np.mean([f[0] for f in found], axis=0), found[0][1]


def estimate(a: dict, values: dict, key: str = "gain", b: dict = None) -> dict:
    """Row a's `key` (gain or forgetting), or a's minus b's: the mean over seeds, a 95% interval and
    whether it excludes zero (None: no interval, nothing measured about the noise). `basis` says what the
    interval accounts for."""
    sa = per_seed(a, values, key)
    sb = per_seed(b, values, key) if b is not None else {None: 0.0}
    if not sa or not sb:
        return {"value": None, "low": None, "high": None, "beyond_noise": None, "basis": None, "seeds": 0}
    shared = sorted(s for s in sa.keys() & sb.keys() if s is not None)
    if b is not None and len(shared) >= 2:
        diffs = [sa[s] - sb[s] for s in shared]
        value, seed_half, seeds = statistics.fmean(diffs), t95(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs)), len(diffs)
    else:  # unpaired seeds (or a single row): each row's own seed spread, where it has one
        value = statistics.fmean(sa.values()) - statistics.fmean(sb.values())
        spreads = [(statistics.variance(s.values()) / len(s), len(s)) for s in (sa, sb) if len(s) >= 2]
        seeds = min((n for _, n in spreads), default=1)
        seed_half = t95(seeds - 1) * math.sqrt(sum(v for v, _ in spreads)) if spreads else None
    items_a = _mean_items(a, values, key)
    items_b = _mean_items(b, values, key) if b is not None else None
    item_low = item_high = None
    if items_a is not None and (b is None or (items_b is not None and np.array_equal(items_a[1], items_b[1]))):
        diff = items_a[0] - (items_b[0] if items_b is not None else 0.0)
        tokens = items_a[1]
        index = resamples(len(tokens))
        boot = diff[index].sum(axis=1) / tokens[index].sum(axis=1)
        low, high = np.quantile(boot, [0.025, 0.975])
        centre = diff.sum() / tokens.sum()
        item_low, item_high = centre - low, high - centre
    if item_low is None and seed_half is None:
        return {"value": value, "low": None, "high": None, "beyond_noise": None, "basis": None, "seeds": seeds}
    seed_part = seed_half or 0.0
    low = value - math.hypot(item_low or 0.0, seed_part)
    high = value + math.hypot(item_high or 0.0, seed_part)
    basis = " and ".join(filter(None, ["test items" if item_low is not None else None,
                                       f"{seeds} seeds" if seed_half is not None else None]))
    return {"value": value, "low": low, "high": high, "beyond_noise": low > 0 or high < 0, "basis": basis, "seeds": seeds}


def better(a: dict, b: dict, values: dict) -> bool:
    """Whether row a learned more than row b, by a difference whose 95% interval excludes zero."""
    result = estimate(a, values, "gain", b)
    return bool(result["beyond_noise"]) and result["value"] > 0


def measurable(row: dict, values: dict) -> bool:
    """Whether the row's gain over the untrained model is above zero beyond noise."""
    result = estimate(row, values, "gain")
    return bool(result["beyond_noise"]) and result["value"] > 0


def ranks(rows: list, values: dict) -> dict:
    """name -> 1 + how many rows learned more than it beyond noise: rows no one beats share rank 1."""
    return {row["name"]: 1 + sum(better(other, row, values) for other in rows if other is not row) for row in rows}


def tiers(ranked_rows: list, values: dict) -> list:
    """Rows best first, grouped by rank: one group holds the rows no row between them separates."""
    rank = ranks(ranked_rows, values)
    groups = {}
    for row in ranked_rows:
        groups.setdefault(rank[row["name"]], []).append(row)
    return [groups[r] for r in sorted(groups)]


# ---- the recommendation ------------------------------------------------------------------------------------

def picks_for_budget(rows: list, key: str, values: dict) -> list:
    """[(limit, row)]: walking up the budget, the row to pick once the budget reaches `limit`: the cheapest
    row that learns more, beyond noise, than every cheaper row (a dearer row tied with a cheaper one never is)."""
    # A run that does not measurably improve on the untrained model is never a pick: training it buys nothing.
    candidates = sorted((r for r in rows if r.get(key) is not None and measurable(r, values)),
                        key=lambda r: (r[key], -r["gain"]))
    picks = []
    for i, row in enumerate(candidates):
        if all(better(row, cheaper, values) for cheaper in candidates[:i]):
            picks.append((row[key], row))
    return picks


def full_row(row: dict, rows: list, values: dict):
    """The full fine-tuning row trained in the same setting as `row` (same model, data and budget; the
    closest when a grid varies the setting), or None when there is none or two are equally close."""
    def setting(r):
        return (values.get(r["runs"][0]) or {}).get("setting") or {}

    mine = setting(row)
    fulls = [r for r in rows if r["method"] == "full" and r.get("gain") is not None
             and setting(r).get("model.name") == mine.get("model.name")]
    distance = {r["name"]: sum(setting(r).get(k) != mine.get(k) for k in set(setting(r)) | set(mine)) for r in fulls}
    if not fulls:
        return None
    closest = min(distance.values())
    matching = [r for r in fulls if distance[r["name"]] == closest]
    return matching[0] if len(matching) == 1 else None


def share_of_full(row: dict, rows: list, values: dict):
    """(share, low, high) of the matching full run's gain, only when that gain is above zero beyond noise;
    else (None, the full row or None). low/high: the paired bootstrap's 95% interval (None without items)."""
    full = full_row(row, rows, values)
    if full is None or row.get("gain") is None:
        return None, None
    if not measurable(full, values):
        return None, full
    share = row["gain"] / full["gain"]
    low = high = None
    items_row, items_full = _mean_items(row, values, "gain"), _mean_items(full, values, "gain")
    if items_row is not None and items_full is not None and np.array_equal(items_row[1], items_full[1]):
        index = resamples(len(items_row[1]))
        ratios = items_row[0][index].sum(axis=1) / items_full[0][index].sum(axis=1)
        low, high = np.quantile(ratios, [0.025, 0.975])
    return (share, low, high), full


def _interval(result: dict, signed: bool = True) -> str:
    if result["low"] is None:
        return "no interval"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"[{fmt.format(result['low'])}, {fmt.format(result['high'])}]"


def describe(row: dict, rows: list, values: dict) -> str:
    gain = estimate(row, values, "gain")
    parts = [f"gain {row['gain']:+.3f} nats/token {_interval(gain)}"]
    if not measurable(row, values):
        parts[0] += " (not measurably better than untrained)"
    if row["method"] != "full":
        share, full = share_of_full(row, rows, values)
        if share is not None:
            parts.append(f"{100 * share[0]:.0f}%" + (f" [{100 * share[1]:.0f}%, {100 * share[2]:.0f}%]" if share[1] is not None else "")
                         + f" of {full['name']}'s gain")
        elif full is not None:
            parts.append(f"{full['name']} did not learn measurably here, so no share of its gain")
    if row.get("forgetting") is not None:
        forgetting = estimate(row, values, "forgetting")
        parts.append(f"forgetting {row['forgetting']:+.3f} {_interval(forgetting)} "
                     + (values.get(row["runs"][0]) or {}).get("forgetting_words", "nats/token on the general text"))
    return ", ".join(parts)


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
    if not seeded or len(row["runs"]) < 2:
        out.append("one seed: the interval covers the test items, not training noise")
    tied = [r["name"] for r in rows if r is not row and r.get("gain") is not None and r["gain"] >= row["gain"]
            and not better(r, row, values)]
    if tied:
        out.append(f"tied with {', '.join(tied)} (the 95% interval of the difference holds zero)")
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


def interval_basis(rows: list, values: dict) -> str:
    """What the intervals of a report account for, in words."""
    bases = {estimate(r, values, "gain")["basis"] for r in rows} - {None}
    if not bases:
        return "no interval could be computed (no per-item losses in eval.json and one seed): nothing is ranked"
    items = next((values[n]["gain_items"] for r in rows for n in r["runs"] if (values.get(n) or {}).get("gain_items")), None)
    text = (f"paired bootstrap over the {len(items[1])} test items every run was scored on ({RESAMPLES} resamples)"
            if items is not None else "")
    if any("seeds" in b for b in bases):
        text += (", combined with " if text else "") + "the seeds' t-interval"
    return text


def recommendation(rows: list, values: dict, search, seeded: bool, memory: str = "peak memory") -> list:
    """Markdown lines: the best overall, then for each budget the pick at each level, with caveats."""
    trained = [r for r in rows if r["status"] != "failed" and r["method"] != "baseline" and r.get("gain") is not None]
    if not trained:
        return ["No trained run finished with a quality to compare; see Failed below."]
    learned = [r for r in trained if measurable(r, values)]
    if not learned:
        return [f"**No method learned measurably**: the 95% interval of every gain over the untrained model holds zero "
                f"({interval_basis(trained, values)}). Train longer or on more data before choosing.", "",
                *(f"- {r['name']}: {describe(r, rows, values)}" for r in sorted(trained, key=lambda r: -r["gain"]))]
    top = tiers(sorted(learned, key=lambda r: -r["gain"]), values)[0]
    lines = []
    if len(top) > 1:
        lines.append(f"**Best learning, tied: {', '.join(r['name'] for r in top)}** (no difference between them excludes "
                     f"zero at 95%); {describe(top[0], rows, values)} for {top[0]['name']}.")
    else:
        lines.append(f"**Best learning: {top[0]['name']}** ({describe(top[0], rows, values)}).")
    lines += ["", "| if your budget is | pick | trained at lr | what it gives | caveats |", "|---|---|---:|---|---|"]
    for key, what, unit in BUDGETS:
        what = memory if key == "peak_mem_mb" else what
        picks = picks_for_budget(trained, key, values)
        for i, (limit, row) in enumerate(picks):
            upper = f" (below {_amount(picks[i + 1][0], unit)})" if i + 1 < len(picks) else " or more"
            notes = caveats(row, trained, values, search, seeded)
            lr = f"{row['lr']:.3g}" if row.get("lr") is not None else "—"
            lines.append(f"| {what} {_amount(limit, unit)}{upper} | **{row['name']}** | {lr} | {describe(row, rows, values)} | "
                         f"{'; '.join(notes) or '—'} |")
    useless = [r["name"] for r in trained if r not in learned]
    if useless:
        lines += ["", f"Not recommended at any budget: {', '.join(useless)} (not measurably better than the untrained "
                      "model on the target)."]
    lines += ["", "Each budget line names the cheapest run that learns more than every cheaper run by a difference whose "
                  f"95% interval excludes zero ({interval_basis(trained, values)}); a dearer run tied with a cheaper one "
                  "is never named. Intervals in brackets."]
    return lines


def noise_lines(rows: list, values: dict, seeded: bool) -> list:
    trained = sorted((r for r in rows if r["status"] != "failed" and r["method"] != "baseline" and r.get("gain") is not None),
                     key=lambda r: -r["gain"])
    lines = [f"Intervals: {interval_basis(trained, values)}."
             + ("" if seeded else " Every method ran once (one seed), so training noise is not in them: add "
                "`seeds: [1, 2, 3]` to the suite to measure it."), "",
             "| pair | gain difference (nats/token) | 95% interval | from | verdict |", "|---|---:|---|---|---|"]
    for i, a in enumerate(trained):
        for b in trained[i + 1:]:
            v = estimate(a, values, "gain", b)
            verdict = {True: "beyond noise", False: "tie: not ranked", None: "no interval: not ranked"}[v["beyond_noise"]]
            lines.append(f"| {a['name']} − {b['name']} | {v['value']:+.4f} | {_interval(v)} | {v['basis'] or '—'} | {verdict} |")
    groups = tiers(trained, values)
    lines += ["", "Ranking (methods in one bracket are not told apart): "
              + " > ".join("[" + ", ".join(r["name"] for r in g) + "]" for g in groups)]
    return lines


def score_lines(runs: list, rows: list) -> list:
    """Markdown lines: each method's per-example generation scores (ROUGE-L, sentence chrF) against the
    untrained model's on the same examples, with paired bootstrap intervals; [] without such items."""
    baselines = [r for r in runs if r["finished"] and r["method"] == "baseline"]
    by_name = {r["name"]: r for r in runs}
    tasks = list(dict.fromkeys(t for r in runs for t, items in (r.get("items") or {}).items() if "rougeL" in items))
    lines = []
    for task in tasks:
        table = []
        for row in rows:
            if row["status"] == "failed" or row["method"] == "baseline":
                continue
            members = [by_name[n] for n in row["runs"] if n in by_name]
            base = baseline_for(members[0], baselines) if members else None
            cells = []
            for metric in ("rougeL", "chrf"):
                diffs = [np.subtract(m["items"][task][metric], base["items"][task][metric]) for m in members
                         if base and task in (m.get("items") or {}) and task in (base.get("items") or {})
                         and len(m["items"][task][metric]) == len(base["items"][task][metric])]
                if len(diffs) != len(members) or not diffs:
                    cells.append("—")
                    continue
                diff = np.mean(diffs, axis=0)
                boot = diff[resamples(len(diff))].mean(axis=1)
                low, high = np.quantile(boot, [0.025, 0.975])
                tie = "" if low > 0 or high < 0 else " (tie)"
                cells.append(f"{diff.mean():+.3f} [{low:+.3f}, {high:+.3f}]{tie}")
            table.append(f"| {row['name']} | " + " | ".join(cells) + " |")
        if table:
            count = len(next(iter(r["items"][task]["rougeL"] for r in runs if task in (r.get("items") or {}))))
            lines += [f"{task}: each method's score minus the untrained model's on the same {count} examples "
                      "(mean, paired bootstrap 95% interval; a tie when it holds zero):", "",
                      "| method | ROUGE-L | chrF |", "|---|---:|---:|", *table, ""]
    return lines
