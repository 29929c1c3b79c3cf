"""README.md and docs/: every relative link resolves (file, and heading for ``#anchor``); the README
stays a front page (at most 250 lines) whose Quick start keeps the two commands CI runs verbatim."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
QUICK_START = (
    "python -m pip install -e . && python -m shardkit demo",
    'python -m pip install -e ".[test]" && python -m pytest -q',
)
MAX_README_LINES = 250

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for no, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((no, line))
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup gone, lower case, punctuation other than hyphens and
    underscores dropped, each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor GitHub makes for the headings of ``path`` (a repeated slug gets -1, -2, …)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link that is not external, outside code."""
    out = []
    for no, line in prose_lines(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(INLINE_CODE.sub("", line)):
            target = m.group(2)
            if target and not EXTERNAL.match(target):
                out.append((no, target))
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """One message per relative link of ``path`` that leads nowhere."""
    bad = []
    for no, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{no}: ({target})"
        if not dest.exists():
            bad.append(f"{where} no such file")
        elif anchor:
            if dest.suffix != ".md" or dest.is_dir():
                bad.append(f"{where} an anchor into a file that is not Markdown")
            elif anchor not in anchors(dest):
                bad.append(f"{where} no heading '#{anchor}' in {dest.relative_to(root)}")
    return bad


def test_slugs_follow_githubs_rules():
    assert github_slug("Already have webdataset shards?") == "already-have-webdataset-shards"
    assert github_slug("The format (v2)") == "the-format-v2"
    assert github_slug("Strict reading, and why not webdataset's tar iterator") == \
        "strict-reading-and-why-not-webdatasets-tar-iterator"
    assert github_slug("`make_loader` and co") == "make_loader-and-co"
    assert github_slug("Object storage and the cache") == "object-storage-and-the-cache"


def test_the_checker_finds_a_broken_link(tmp_path):
    (tmp_path / "b.md").write_text("# Title here\n\n```\n# not a heading\n```\n")
    page = tmp_path / "a.md"
    page.write_text(
        "[ok](b.md) [ok](b.md#title-here) [ok](#local) [web](https://example.com/x#y)\n"
        "`[in code](nowhere.md)`\n\n## Local\n\n"
        "[gone](missing.md) [bad anchor](b.md#not-a-heading) [bad local](#nope)\n")
    bad = broken_links(page, root=tmp_path)
    assert [b.split("(")[1].split(")")[0] for b in bad] == \
        ["missing.md", "b.md#not-a-heading", "#nope"], bad


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    bad = broken_links(path)
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_readme_links_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in relative_links(README)}
    unlinked = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert unlinked == [], f"docs pages the README does not link: {unlinked}"


def test_docs_pages_start_with_a_summary_and_a_link_back():
    for page in sorted(DOCS.glob("*.md")):
        lines = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
        assert lines[0].startswith("# "), page.name
        assert "](../README.md" in lines[1], f"{page.name}: no link back to the README"


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines (at most {MAX_README_LINES})"


def test_quick_start_keeps_its_two_commands():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Quick start\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert m, "README.md has no 'Quick start' section"
    lines = [line.strip() for line in m.group(1).splitlines()]
    for command in QUICK_START:
        assert command in lines, f"Quick start lost: {command}"


def test_readme_keeps_a_design_choices_section():
    assert re.search(r"^## Design choices$", README.read_text(encoding="utf-8"), flags=re.M)
