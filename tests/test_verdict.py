"""What the report concludes from measured numbers: intervals from a paired bootstrap over the test items
and from the seeds, rankings that never separate methods within those intervals, the share of the matching
full run's gain, the pick for each budget, and successive halving's schedule."""
import math

import numpy as np
import pytest

from tunebench import search, verdict


def row(name, gains, items=None, method=None, setting=None, **values):
    """A report row of a recipe trained with seeds 1..n (one run without a seed suffix when n is 1), its runs'
    gains, and, when given, the per-item gains (nats per item, items of 100 tokens) of every run."""
    runs = [f"{name}-seed{i + 1}" for i in range(len(gains))] if len(gains) > 1 else [name]
    per_item = None if items is None else (np.asarray(items, dtype=float), np.full(len(items), 100.0))
    per_run = {run: {"gain": g, "forgetting": None, "gain_items": per_item, "forgetting_items": None,
                     "setting": setting or {"model.name": "m"}} for run, g in zip(runs, gains)}
    r = {"name": name, "method": method or name.split("_")[0], "status": f"{len(gains)} seeds", "runs": runs,
         "gain": sum(gains) / len(gains), "std": {}, "lr": 1e-4, **values}
    return r, per_run


def noisy_items(gain_per_token, n=40, spread=5.0, seed=0):
    """Per-item gains of n items of 100 tokens, averaging gain_per_token per token, with item-to-item spread."""
    noise = np.random.default_rng(seed).normal(0, spread, n)
    noise -= noise.mean()
    return 100 * gain_per_token + noise


def test_t_quantile_beyond_30_degrees_of_freedom_does_not_fall_to_the_normal():
    # Student's t, two-sided 95%: 31 df 2.0395, 40 df 2.0211, 60 df 2.0003, 120 df 1.9799 (textbook tables)
    for df, expected in ((31, 2.0395), (40, 2.0211), (60, 2.0003), (120, 1.9799)):
        assert verdict.t95(df) == pytest.approx(expected, abs=5e-4)
    assert verdict.t95(30) > verdict.t95(31) > verdict.t95(1000) > 1.96


def test_paired_t_interval_over_seeds_matches_the_textbook_formula():
    a, va = row("full", [0.50, 0.61, 0.72])
    b, vb = row("lora", [0.40, 0.41, 0.42])
    result = verdict.estimate(a, {**va, **vb}, "gain", b)
    # differences 0.10, 0.20, 0.30: mean 0.2, sd 0.1, t(2 df, 97.5%) = 4.303
    half = 4.303 * 0.1 / math.sqrt(3)
    assert result["value"] == pytest.approx(0.2) and result["seeds"] == 3
    assert (result["low"], result["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert result["beyond_noise"] is False  # the interval holds zero
    c, vc = row("top2", [0.30, 0.31, 0.32])
    assert verdict.estimate(b, {**vb, **vc}, "gain", c)["beyond_noise"] is True  # 0.1 every seed


def test_one_seed_gets_an_interval_from_the_test_items():
    # One seed, 400 items: the bootstrap interval of a ratio of sums is close to mean +- 1.96 standard errors.
    items = noisy_items(0.05, n=400, spread=4.0)
    a, va = row("lora", [0.05], items=items)
    result = verdict.estimate(a, va, "gain")
    standard_error = items.std(ddof=1) / math.sqrt(len(items)) / 100
    assert result["value"] == pytest.approx(0.05)
    assert result["high"] - result["low"] == pytest.approx(2 * 1.96 * standard_error, rel=0.1)
    assert result["beyond_noise"] is True and result["basis"] == "test items"
    # A gain of 0.001 nats per token with the same item spread is not told apart from zero.
    tiny, vt = row("prompt", [0.001], items=noisy_items(0.001, n=400, spread=4.0))
    assert verdict.estimate(tiny, vt, "gain")["beyond_noise"] is False
    assert not verdict.measurable(tiny, vt)


def test_paired_items_tell_apart_what_unpaired_noise_hides():
    # Both methods gain 0.30 and 0.32 per token; the items vary a lot, but the same way for both: the pair is
    # told apart item by item.
    shared = noisy_items(0.30, spread=20.0)
    a, va = row("full", [0.32], items=shared + 2.0)
    b, vb = row("lora", [0.30], items=shared)
    values = {**va, **vb}
    assert verdict.better(a, b, values)
    assert verdict.ranks([a, b], values) == {"full": 1, "lora": 2}
    # Unrelated item noise of the same size hides it: a tie, both ranked first.
    c, vc = row("lora", [0.30], items=noisy_items(0.30, spread=20.0, seed=7))
    assert not verdict.better(a, c, {**va, **vc})
    assert verdict.ranks([a, c], {**va, **vc}) == {"full": 1, "lora": 1}


def test_a_row_with_one_surviving_seed_is_not_ranked_on_any_margin():
    a, va = row("full", [0.50, 0.60, 0.70])
    b, vb = row("lora", [0.55])  # its other seeds failed; no per-item losses
    values = {**va, **vb}
    assert not verdict.better(a, b, values)  # 0.60 against 0.55: inside full's own seed spread
    assert verdict.ranks([a, b], values) == {"full": 1, "lora": 1}


def test_budget_pick_must_beat_every_cheaper_run_not_only_the_previous_pick():
    # prompt (cheapest) and top2 are tied; lora learns more than prompt but not more than top2, which is
    # cheaper: lora is never the pick, top2 never either (tied with the cheaper prompt).
    prompt, vp = row("prompt", [0.300], items=noisy_items(0.300, spread=0.9), peak_mem_mb=1000.0)
    top2, vt = row("top2", [0.303], items=noisy_items(0.303, spread=0.9, seed=1), peak_mem_mb=1500.0)
    lora, vl = row("lora", [0.306], items=noisy_items(0.306, spread=0.9, seed=2), peak_mem_mb=2000.0)
    values = {**vp, **vt, **vl}
    assert verdict.better(lora, prompt, values) and not verdict.better(lora, top2, values)
    assert not verdict.better(top2, prompt, values)
    picks = verdict.picks_for_budget([prompt, top2, lora], "peak_mem_mb", values)
    assert [r["name"] for _, r in picks] == ["prompt"]
    lines = "\n".join(verdict.recommendation([prompt, top2, lora], values, None, seeded=False))
    assert "| peak memory 1,000 MB or more | **prompt** |" in lines
    assert "**Best learning, tied:" in lines and "rate not tuned" in lines and "one seed" in lines


def test_share_needs_a_measurable_gain_of_the_matching_full_run():
    lora, vl = row("lora", [0.30], items=noisy_items(0.30), setting={"model.name": "m", "data.max_length": 128})
    full, vf = row("full", [0.40], items=noisy_items(0.40, seed=3), setting={"model.name": "m", "data.max_length": 128})
    # Other full runs: another model, and the same model at another sequence length (a grid point).
    other_model, vo = row("full_big", [0.01], method="full", items=noisy_items(0.01, seed=4),
                          setting={"model.name": "big", "data.max_length": 128})
    other_length, vg = row("full-max_length512", [0.9], method="full", items=noisy_items(0.9, seed=5),
                           setting={"model.name": "m", "data.max_length": 512})
    rows = [other_model, other_length, full, lora]
    values = {**vl, **vf, **vo, **vg}
    share, matched = verdict.share_of_full(lora, rows, values)
    assert matched is full and share[0] == pytest.approx(0.75) and share[1] < 0.75 < share[2]
    text = verdict.describe(lora, rows, values)
    assert "75% [" in text and "of full's gain" in text
    # Full fine-tuning that did not learn measurably (+0.004 nats with item noise): no share, said in words.
    weak, vw = row("full", [0.004], items=noisy_items(0.004, spread=3.0, seed=6),
                   setting={"model.name": "m", "data.max_length": 128})
    share, matched = verdict.share_of_full(lora, [weak, lora], {**vl, **vw})
    assert share is None and matched is weak
    text = verdict.describe(lora, [weak, lora], {**vl, **vw})
    assert "%" not in text and "full did not learn measurably here" in text


def test_nothing_learned_measurably_recommends_nothing():
    a, va = row("lora", [0.002], items=noisy_items(0.002, spread=3.0))
    lines = "\n".join(verdict.recommendation([a], va, None, seeded=False))
    assert "**No method learned measurably**" in lines and "| if your budget is" not in lines


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
