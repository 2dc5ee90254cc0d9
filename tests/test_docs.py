"""The README and docs/ stay true to the tree: every relative link reaches a file and, with #anchor, a
heading there; the README's module map names every module, in import order."""
import ast
import re
from pathlib import Path

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


def tunebench_imports(path: Path) -> set:
    """The tunebench modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module == "tunebench":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tunebench."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tunebench.")}
    return found - {path.stem}


def test_module_map_names_every_module_in_import_order():
    """Rows of the README's module table: `tunebench/a.py` or `tunebench/a.py` ↔ `b.py` (a pair that
    imports each other), or `train.py` / `evaluate.py`. Each imports only modules in earlier rows or its pair."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("The modules, in import order", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in table.splitlines():
        cell = line.split("|")[1] if line.startswith("| `") else ""
        names = [Path(n).stem for n in re.findall(r"`([\w/]+\.py)`", cell)]
        if names:
            rows.append(names)
    modules = {p.stem: p for p in (ROOT / "tunebench").glob("*.py") if p.stem != "__init__"}
    modules.update(train=ROOT / "train.py", evaluate=ROOT / "evaluate.py")
    listed = [name for row in rows for name in row]
    assert sorted(listed) == sorted(modules), "the module map must name every module once"
    earlier = set()
    for row in rows:
        for name in row:
            climbs = tunebench_imports(modules[name]) - earlier - set(row) - {"__init__"}
            assert not climbs, f"{name} imports {sorted(climbs)}, listed below it in the README's module map"
        earlier |= set(row)
