"""report.html: the report as one self-contained page to share. The recommendation and the table come
first, then the plots (PNG embedded as data: URIs), then the generations side by side (one column per
model, the reference first), then the rest of report.md (noise, search, grid, failures, setting).

Nothing is fetched when the page opens: no script, no font or style sheet from elsewhere, and the
page's Content-Security-Policy forbids every load but its own images and styles, so it opens the same
offline, from a mail attachment or a file share. The Markdown of report.md is rendered by
markdown-it-py with raw HTML off, so text from runs (errors, generations) is shown, never interpreted.
"""
import base64
import html
from pathlib import Path

from markdown_it import MarkdownIt

from tunebench.report_generations import shown_prompt

# Plots in the order they are shown; report.md's "Plots" section says what each one is.
PLOT_FILES = ["loss_curves.png", "pareto.png", "learning_forgetting.png", "lr_sweep.png", "grid.png"]
FIRST = ("Recommendation", "Results")  # report.md sections shown before the plots
REPLACED = ("Plots", "Generations side by side")  # shown as images and columns instead of their Markdown
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1400px;
       padding: 0 20px; color: #1d1d1f; }
h1 { font-size: 26px; } h2 { margin-top: 34px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 10px 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; white-space: nowrap; }
th { background: #f2f4f7; } tr:nth-child(even) td { background: #fafbfc; }
figure { margin: 14px 0 24px; } figure img { max-width: 100%; border: 1px solid #e4e4e4; }
figcaption { color: #555; font-size: 13px; }
pre, .text { white-space: pre-wrap; word-break: break-word; font: 12.5px/1.4 ui-monospace, Menlo, Consolas, monospace; }
pre { background: #f6f8fa; padding: 8px; border-radius: 4px; overflow-x: auto; }
.prompt { border: 1px solid #d8dee4; border-radius: 6px; margin: 16px 0 28px; padding: 10px 12px; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(210px, 1fr)); gap: 10px; margin-top: 10px; }
.answer { border: 1px solid #d8dee4; border-radius: 6px; padding: 8px; background: #fff; }
.answer.reference { background: #eef6ee; border-color: #9cc79c; }
.answer h4 { margin: 0 0 6px; font-size: 13px; } .score { color: #555; font-weight: normal; }
"""


def sections(markdown: str) -> tuple:
    """(title line, [(heading, body)]) of report.md, split at its "## " headings."""
    title, parts = "", []
    for line in markdown.splitlines():
        if line.startswith("# ") and not title and not parts:
            title = line[2:].strip()
        elif line.startswith("## "):
            parts.append((line[3:].strip(), []))
        elif parts:
            parts[-1][1].append(line)
    return title, [(heading, "\n".join(body)) for heading, body in parts]


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def plots_html(out: Path, captions: dict) -> str:
    figures = []
    for name in PLOT_FILES:
        if (out / name).is_file():
            caption = html.escape(captions.get(name, name))
            figures.append(f'<figure><img src="{data_uri(out / name)}" alt="{html.escape(name)}">'
                           f"<figcaption><code>{html.escape(name)}</code>: {caption}</figcaption></figure>")
    return "\n".join(figures)


def plot_captions(plots_markdown: str) -> dict:
    """file name -> its line in report.md's Plots section ("- `pareto.png`: what it shows")."""
    captions = {}
    for line in plots_markdown.splitlines():
        if line.startswith("- `") and "`: " in line:
            name, _, text = line[3:].partition("`: ")
            captions[name] = text
    return captions


def generations_html(view: dict) -> str:
    parts = [f"<p>{len(view['examples'])} held-out prompts of task <code>{html.escape(view['task'])}</code>, chosen with "
             f"seed {view['seed']} among the {view['prompts']} every model answered: the reference, then what each model "
             "wrote (<code>generations.jsonl</code> in each run folder has them all).</p>"]
    for number, example in enumerate(view["examples"], 1):
        cards = [f'<div class="answer reference"><h4>reference</h4><div class="text">{html.escape(example["reference"])}</div></div>']
        for name, output in example["outputs"].items():
            score = example["judge_scores"].get(name)
            shown = f' <span class="score">judge {score:g}/100</span>' if isinstance(score, (int, float)) else ""
            cards.append(f'<div class="answer"><h4>{html.escape(name)}{shown}</h4>'
                         f'<div class="text">{html.escape(output) or "<em>(empty)</em>"}</div></div>')
        parts.append(f'<div class="prompt"><h3>Prompt {number} <span class="score">(example {example["id"]})</span></h3>'
                     f'<pre>{html.escape(shown_prompt(example["prompt"]))}</pre><div class="columns">{"".join(cards)}</div></div>')
    return "\n".join(parts)


def page(markdown: str, out: Path, view) -> str:
    """The whole page for report.md's text, the PNG plots in `out` and the side-by-side view."""
    render = MarkdownIt("commonmark", {"html": False}).enable("table").render
    title, parts = sections(markdown)
    by_heading = dict(parts)
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading in FIRST:
        if heading in by_heading:
            body.append(f"<h2>{html.escape(heading)}</h2>\n{render(by_heading[heading])}")
    plots = plots_html(out, plot_captions(by_heading.get("Plots", "")))
    if plots:
        body.append(f"<h2>Plots</h2>\n{plots}")
    if view:
        body.append(f"<h2>Generations side by side</h2>\n{generations_html(view)}")
    for heading, text in parts:
        if heading not in FIRST and heading not in REPLACED:
            body.append(f"<h2>{html.escape(heading)}</h2>\n{render(text)}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
