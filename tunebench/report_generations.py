"""The generations side by side: a handful of held-out prompts that every model answered, chosen with
the evaluation seed, each with the reference and what each model wrote (and the judge's score where
there is one). report.md shows them as Markdown (here), report.html as columns
(tunebench/report_html.py); both show a long prompt as shown_prompt cuts it.
"""
import random

from tunebench.report_rows import finite_number


GENERATION_EXAMPLES = 5  # prompts shown side by side
PROMPT_CHARS = 1000  # a longer prompt shows its end (what the model read last); generations.jsonl has it whole


def side_by_side(runs: list, count: int = GENERATION_EXAMPLES):
    """A handful of held-out prompts of the first generation task the runs were evaluated on, chosen with
    the evaluation seed among the prompts every such run answered, with the reference and each run's
    output (and the judge's score where there is one). None without generations."""
    with_texts = [r for r in runs if r["finished"] and r["generations"]]
    if not with_texts:
        return None
    task = with_texts[0]["generations"][0]["task"]
    per_run = {}
    for run in with_texts:
        records = {(g["prompt"], g["reference"]): g for g in run["generations"] if g.get("task") == task}
        if records:
            per_run[run["name"]] = records
    first = next(iter(per_run.values()))
    common = [key for key in first if all(key in records for records in per_run.values())]
    seed = next((r["eval_seed"] for r in with_texts if r["eval_seed"] is not None), 42)
    chosen = sorted(random.Random(seed).sample(range(len(common)), min(count, len(common))))
    examples = []
    for i in chosen:
        key = common[i]
        examples.append({"id": first[key].get("id"), "prompt": key[0], "reference": key[1],
                         "outputs": {name: records[key].get("output", "") for name, records in per_run.items()},
                         "judge_scores": {name: records[key].get("judge_score") for name, records in per_run.items()}})
    return {"task": task, "seed": seed, "prompts": len(common), "examples": examples}


def shown_prompt(prompt: str) -> str:
    return prompt if len(prompt) <= PROMPT_CHARS else f"… ({len(prompt) - PROMPT_CHARS} characters before) " + prompt[-PROMPT_CHARS:]


def _fenced(text: str) -> list:
    fence = "~~~"
    while fence in text:
        fence += "~"
    return [fence + "text", text if text else "(empty)", fence]


def side_by_side_markdown(view: dict) -> list:
    lines = [f"{len(view['examples'])} held-out prompts of task `{view['task']}`, chosen with seed {view['seed']} among the "
             f"{view['prompts']} every model answered: the reference, then what each model wrote (`generations.jsonl` "
             "in each run folder has them all)."]
    for number, example in enumerate(view["examples"], 1):
        lines += ["", f"### Prompt {number} (example {example['id']})", "", *_fenced(shown_prompt(example["prompt"])), "",
                  "**Reference**", "", *_fenced(example["reference"])]
        for name, output in example["outputs"].items():
            score = example["judge_scores"].get(name)
            lines += ["", f"**{name}**" + (f" (judge: {score:g}/100)" if finite_number(score) is not None else ""), "", *_fenced(output)]
    return lines
