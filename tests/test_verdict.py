"""What the report concludes from measured numbers: the paired seed test, rankings that never separate
methods within noise, the pick for each budget, and successive halving's schedule."""
import math

import pytest

from tunebench import search, verdict


def row(name, gains, **values):
    """A report row of a recipe trained with seeds 1..n, and its runs' gains."""
    runs = [f"{name}-seed{i + 1}" for i in range(len(gains))]
    per_run = {run: {"gain": g, "forgetting": None} for run, g in zip(runs, gains)}
    r = {"name": name, "method": name.split("_")[0], "status": f"{len(gains)} seeds", "runs": runs,
         "gain": sum(gains) / len(gains), "std": {}, "lr": 1e-4, **values}
    return r, per_run


def test_paired_t_interval_matches_the_textbook_formula():
    a, va = row("full", [0.50, 0.61, 0.72])
    b, vb = row("lora", [0.40, 0.41, 0.42])
    result = verdict.compare_pair(a, b, {**va, **vb})
    # differences 0.10, 0.20, 0.30: mean 0.2, sd 0.1, t(2 df, 97.5%) = 4.303
    half = 4.303 * 0.1 / math.sqrt(3)
    assert result["diff"] == pytest.approx(0.2) and result["n"] == 3
    assert (result["low"], result["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert result["beyond_noise"] is False  # the interval holds zero
    c, vc = row("top2", [0.30, 0.31, 0.32])
    assert verdict.compare_pair(b, c, {**vb, **vc})["beyond_noise"] is True  # 0.1 every seed


def test_ranking_keeps_methods_within_noise_together():
    a, va = row("full", [0.50, 0.61, 0.72])
    b, vb = row("lora", [0.40, 0.41, 0.42])
    c, vc = row("prompt", [0.10, 0.11, 0.12])
    groups = verdict.tiers([a, b, c], {**va, **vb, **vc})
    assert [[r["name"] for r in g] for g in groups] == [["full", "lora"], ["prompt"]]
    lines = "\n".join(verdict.noise_lines([a, b, c], {**va, **vb, **vc}, seeded=True))
    assert "| full − lora | +0.2000 |" in lines and "within noise: not ranked" in lines
    assert "[full, lora] > [prompt]" in lines


def test_budget_picks_the_cheapest_run_that_learns_more_beyond_noise():
    full, vf = row("full", [0.50, 0.61, 0.72], peak_mem_mb=3000.0)
    lora, vl = row("lora", [0.40, 0.41, 0.42], peak_mem_mb=2000.0)
    prompt, vp = row("prompt", [0.10, 0.11, 0.12], peak_mem_mb=1500.0)
    values = {**vf, **vl, **vp}
    picks = verdict.picks_for_budget([full, lora, prompt], "peak_mem_mb", values)
    # full learns more than lora on average, but not beyond noise: with more memory lora stays the pick.
    assert [(limit, r["name"]) for limit, r in picks] == [(1500.0, "prompt"), (2000.0, "lora")]
    lines = "\n".join(verdict.recommendation([full, lora, prompt], values, None, seeded=True))
    assert "**Best learning: full, lora**, within seed noise" in lines
    assert "| peak memory 2,000 MB or more | **lora** |" in lines and "within seed noise of full" in lines
    assert "rate not tuned" in lines


def test_share_of_full_fine_tunings_gain():
    full, _ = row("full", [0.4])
    lora, _ = row("lora", [0.3])
    assert verdict.share_of_full(lora, [full, lora]) == pytest.approx(0.75)


@pytest.mark.parametrize("rates,first,reduction,max_steps,expected", [
    (3, 4, 3, 12, [(4, 3), (12, 1)]),
    (9, 1, 3, 9, [(1, 9), (3, 3), (9, 1)]),
    (4, 3, 2, 12, [(3, 4), (6, 2), (12, 1)]),
    (4, 12, 2, 12, [(12, 4)]),  # a first rung at the end: no halving, every rate trains to the end
])
def test_successive_halving_rungs(rates, first, reduction, max_steps, expected):
    assert search.rungs_for(rates, first, reduction, max_steps) == expected
    plan = {"rungs": expected}
    assert search.tuning_steps(plan) == sum(alive * (steps - before) for (steps, alive), before
                                            in zip(expected, [0] + [s for s, _ in expected[:-1]]))


def test_log_spaced_rates_center_on_the_recipes_rate():
    assert search.log_spaced(2e-4, 3, 5) == [4e-5, 2e-4, 1e-3]
    assert search.log_spaced(1e-3, 2, 4) == [5e-4, 2e-3]
