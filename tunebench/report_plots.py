"""The report's plots, one PNG each: loss_curves.png, pareto.png, lr_sweep.png,
learning_forgetting.png and grid.png. matplotlib is imported when a plot is drawn (write_report
sets its Agg backend); each file is written whole or not at all.
"""
import math
import os
from pathlib import Path

from tunebench.report_rows import group_key, quality_metric


def _colors(names: list) -> dict:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def plot_loss_curves(runs: list, path: Path) -> None:
    import matplotlib.pyplot as plt

    logged = [r for r in runs if r["log"]]
    by_tokens = all("tokens" in rec for r in logged for rec in r["log"])
    x_key, x_label = ("tokens", "training tokens") if by_tokens else ("step", "optimizer step")
    colors = _colors(list(dict.fromkeys(group_key(r["name"]) for r in logged)))
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True, sharey=True)
    labelled = set()
    for run in logged:
        group = group_key(run["name"])
        label = None if group in labelled else group + ("" if run["finished"] else " (failed)")
        labelled.add(group)
        style = dict(color=colors[group], linestyle="-" if run["finished"] else ":")
        train = [(rec[x_key], rec["train_loss"]) for rec in run["log"] if rec.get("train_loss") is not None]
        val = [(rec[x_key], rec["val_loss"]) for rec in run["log"] if rec.get("val_loss") is not None]
        if train:
            ax_train.plot(*zip(*train), marker=".", markersize=4, label=label, **style)
        if val:
            ax_val.plot(*zip(*val), marker="o", markersize=3, label=label, **style)
    ax_train.set_title("train loss (mean since the previous log line)")
    ax_val.set_title("validation loss")
    for ax in (ax_train, ax_val):
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    ax_train.set_ylabel("loss (nats per token)")
    if logged:
        ax_val.legend(fontsize=8, loc="upper right")
    else:
        ax_train.text(0.5, 0.5, "no run has a log.jsonl", ha="center", transform=ax_train.transAxes)
    _save(fig, path)
    plt.close(fig)


def _frontier(points: list) -> list:
    """The points no other point beats on both axes (lower x and lower y), sorted by x."""
    best, out = math.inf, []
    for x, y in sorted(points):
        if y < best:
            out.append((x, y))
            best = y
    return out


def plot_pareto(rows: list, evals: list, path: Path) -> tuple:
    import matplotlib.pyplot as plt

    q_key, q_label = quality_metric(rows, evals)
    use_gpu = any(r.get("peak_gpu_mem_mb") is not None for r in rows)
    mem_key = "peak_gpu_mem_mb" if use_gpu else "peak_cpu_rss_mb"
    panels = [
        ("trainable_params", "trainable parameters"),
        (mem_key, "peak GPU memory (MB)" if use_gpu else "peak CPU memory, RSS (MB)"),
        ("train_time_s", "training time (s)"),
    ]
    done = [r for r in rows if r["status"] != "failed" and r.get(q_key) is not None]
    baselines = [r for r in done if r["method"] == "baseline"]
    trained = [r for r in done if r["method"] != "baseline"]
    colors = _colors([r["name"] for r in trained])
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), sharey=True)
    for ax, (x_key, x_label) in zip(axes, panels):
        points = []
        for row in trained:
            x, y = row.get(x_key), row[q_key]
            if x is None or x <= 0:
                continue
            points.append((x, y))
            ax.errorbar(x, y, yerr=row["std"].get(q_key), fmt="o", color=colors[row["name"]], capsize=3, label=row["name"])
            ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if len(points) > 1:
            ax.step(*zip(*_frontier(points)), where="post", color="grey", alpha=0.5, linewidth=1, label="Pareto front")
        for row in baselines:
            ax.axhline(row[q_key], color="black", linestyle="--", linewidth=1, label=f"{row['name']} (not trained)")
        xs = [x for x, _ in points]
        if xs and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        else:
            ax.set_xlim(left=0)  # a linear axis from zero shows differences at their true proportion
        ax.set_xlabel(x_label + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel(q_label)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"Quality against cost: {q_label}")
    _save(fig, path)
    plt.close(fig)
    return q_key, q_label


def plot_lr_sweep(search: dict, path: Path) -> None:
    """The search's metric against the learning rate, per method: a line through every rate at the first
    rung, a marker per later rung, the chosen rate circled and the recipe's own rate as a dotted line."""
    import matplotlib.pyplot as plt

    methods = search["methods"]
    colors = _colors(list(methods))
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "os^Dv*"
    for name, method in methods.items():
        color = colors[name]
        for rung, info in enumerate(search["rungs"]):
            points = sorted((t["lr"], t["value"]) for t in method["trials"]
                            if t["rung"] == rung and t["value"] is not None and math.isfinite(t["value"]))
            if not points:
                continue
            label = f"{name} (rung {rung + 1}: {info['steps']} steps)" if rung == 0 else None
            ax.plot(*zip(*points), marker=markers[rung % len(markers)], color=color, alpha=0.5 if rung == 0 else 1.0,
                    linestyle="-" if rung == 0 else ":", label=label)
        for t in method["trials"]:
            if t["diverged"] and t["rung"] == 0:
                ax.axvline(t["lr"], color=color, alpha=0.3, linewidth=4)
        if method.get("best_lr") is not None and method.get("best_value") is not None and math.isfinite(method["best_value"]):
            ax.scatter([method["best_lr"]], [method["best_value"]], s=180, facecolors="none", edgecolors=color, linewidths=2)
        ax.axvline(method["recipe_lr"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale; dotted: the recipe's own, wide band: diverged)")
    metric = {"val_loss": "validation loss (lower is better)", "val_acc": "validation accuracy (higher is better)"}[search["metric"]]
    ax.set_ylabel(metric)
    ax.set_title(f"Learning-rate search: {search['rates_per_method']} rates per method, successive halving "
                 f"({' → '.join(str(r['steps']) for r in search['rungs'])} steps); circled: chosen", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def plot_learning_forgetting(rows: list, path: Path, gain_label: str, forgetting_label: str) -> None:
    """Gain on the target against forgetting (on the general text, or lm-eval tasks), one point per method
    (error bars: the 95% intervals; a hollow point: a gain not measurably above zero)."""
    import matplotlib.pyplot as plt

    def bar(row, key):
        if row.get(f"{key}_low") is None:
            return None
        return [[row[key] - row[f"{key}_low"]], [row[f"{key}_high"] - row[key]]]

    points = [r for r in rows if r["status"] != "failed" and r.get("gain") is not None and r.get("forgetting") is not None]
    colors = _colors([r["name"] for r in points])
    fig, ax = plt.subplots(figsize=(7, 5))
    for row in points:
        tied = row.get("gain_low") is None or row["gain_low"] <= 0
        ax.errorbar(row["gain"], row["forgetting"], xerr=bar(row, "gain"), yerr=bar(row, "forgetting"),
                    fmt="o", mfc="white" if tied else colors[row["name"]], color=colors[row["name"]], capsize=3,
                    label=f"{row['name']} (rank {row.get('rank', '—')})")
        ax.annotate(row["name"], (row["gain"], row["forgetting"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(0, color="black", linestyle="--", linewidth=1)
    ax.axvline(0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(f"learning: gain on the target (nats/token; {gain_label})")
    ax.set_ylabel("forgetting: " + forgetting_label.replace(" (positive", "\n(positive"), fontsize=8)
    ax.set_title("Learning against forgetting (right: learns more; down: forgets less)\n"
                 "bars: 95% intervals; hollow: gain not measurably above zero; equal ranks: tied", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_grid(points: dict, q_label: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    keys = list(points)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), squeeze=False)
    methods = list(dict.fromkeys(m for per in points.values() for m in per))
    colors = _colors(methods)
    for ax, key in zip(axes[0], keys):
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for per in points[key].values() for v, _, _ in per)
        labels = list(dict.fromkeys(str(v) for per in points[key].values() for v, _, _ in per))
        for method, series in points[key].items():
            xs = [v if numeric else labels.index(str(v)) for v, _, _ in series]
            ax.errorbar(xs, [q for _, q, _ in series], yerr=[s for _, _, s in series], marker="o", capsize=3,
                        color=colors[method], label=method)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif len({v for per in points[key].values() for v, _, _ in per}) > 2:
            values = [v for per in points[key].values() for v, _, _ in per]
            if min(values) > 0 and max(values) / min(values) > 20:
                ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(q_label)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Grid: the metric against each swept key (other swept keys averaged), one line per method")
    _save(fig, path)
    plt.close(fig)
