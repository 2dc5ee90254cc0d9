"""The README and docs/ stay true to the tree: every relative link reaches a file and, with #anchor, a
heading there; the README's module map names every module, in import order."""
import re
from pathlib import Path

from test_imports import import_graph

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(text: str):
    """(line number, line) outside fenced and indented code blocks, inline code spans removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    ") and not line.lstrip().startswith(("-", "|", "[")):
            continue
        yield number, re.sub(r"`[^`]*`", "", line)


def anchors(page: Path) -> set:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    found, seen, fenced = set(), {}, False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for number, line in prose(page.read_text(encoding="utf-8")):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue  # https:, mailto:
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


def test_module_map_names_every_module_in_import_order():
    """Rows of the README's module table, `tunebench/a.py` or `train.py`: each imports only modules of earlier rows."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("The modules, in import order", 1)[1].split("\n## ", 1)[0]
    listed = [Path(name).stem for line in table.splitlines() if line.startswith("| `")
              for name in re.findall(r"`([\w/]+\.py)`", line.split("|")[1])]
    graph = {name.removeprefix("tunebench."): {m.removeprefix("tunebench.") for m in imported}
             for name, imported in import_graph().items() if name != "tunebench.__init__"}
    assert sorted(listed) == sorted(graph), "the module map must name every module once"
    for row, name in enumerate(listed):
        climbs = graph[name] - set(listed[:row])
        assert not climbs, f"{name} imports {sorted(climbs)}, listed below it in the README's module map"
