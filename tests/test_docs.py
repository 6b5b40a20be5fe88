"""The front page and docs/ stay navigable: every relative link resolves, README.md stays a front page."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_LINES = 350
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:name|id)=\"([^\"]+)\"")
_EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, in_fence = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            out.append((i, line))
    return out


def heading_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (before de-duplication)."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # punctuation goes (backticks, colons, slashes, parentheses, ...)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor a Markdown file defines: heading slugs (duplicates numbered as GitHub does) and HTML anchors."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(text):
        m = _HEADING.match(line)
        if m:
            slug = heading_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
        out.update(_HTML_ANCHOR.findall(line))
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline, image and reference-style link outside code."""
    out = []
    for i, line in _prose_lines(text):
        prose = _CODE_SPAN.sub("", line)
        out.extend((i, t) for t in _INLINE_LINK.findall(prose))
        m = _REF_LINK.match(prose)
        if m:
            out.append((i, m.group(1)))
    return out


def broken_links(md: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """What is wrong with each relative link of ``md``: a missing file, a path outside ``root``, an unknown anchor."""
    problems = []
    for line, target in links(md.read_text(encoding="utf-8")):
        if not target or _EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md.resolve()
        where = f"{md.relative_to(root)}:{line}: ({target})"
        if not dest.is_relative_to(root.resolve()):
            problems.append(f"{where} points outside the repository")
        elif not dest.exists():
            problems.append(f"{where} -> {path}: no such file or folder")
        elif anchor:
            if dest.suffix.lower() != ".md" or dest.is_dir():
                problems.append(f"{where}: an anchor on a file that is not Markdown")
            elif anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: {dest.name} has no heading with the anchor #{anchor}")
    return problems


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(md):
    problems = broken_links(md)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_a_front_page():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; expected at most {README_MAX_LINES} (details: docs/)"


def test_readme_shows_the_test_command_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [ln.strip() for ln in ci.splitlines() if "pytest" in ln and not ln.lstrip().startswith("#")]
    assert commands, f"expected a pytest command in .ci/run, got:\n{ci}"
    readme = README.read_text(encoding="utf-8")
    for cmd in commands:
        assert cmd in readme, f"CI runs {cmd!r}; expected README.md to show that exact command"


def test_readme_layout_is_marked_for_sync():
    assert "<!-- layout: keep in sync -->" in README.read_text(encoding="utf-8")


def _layout_block() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("<!-- layout: keep in sync -->")
    a = text.index("```", start) + 3
    return text[a:text.index("```", a)]


def test_readme_layout_names_every_module_and_folder():
    block = _layout_block()
    pkg = ROOT / "d2l_fast"
    names = [p.name for p in pkg.glob("*.py")] + [p.name + "/" for p in pkg.iterdir()
                                                    if p.is_dir() and not p.name.startswith("__")]
    names += [p.name + "/" for p in (ROOT / "tests").iterdir() if p.is_dir() and not p.name.startswith("__")]
    missing = [n for n in sorted(names) if n not in block]
    assert not missing, f"README layout does not mention: {missing}"


def test_heading_slugs_follow_github():
    assert heading_slug("Drop-in (same names and semantics as the reference `ctx_to_lora`)") == (
        "drop-in-same-names-and-semantics-as-the-reference-ctx_to_lora")
    assert heading_slug("Export to PEFT / vLLM (scale-out)") == "export-to-peft--vllm-scale-out"
    assert heading_slug("Compile report (`d2l-fast compile-report`)") == "compile-report-d2l-fast-compile-report"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Part one\n\ntext\n", encoding="utf-8")
    md = tmp_path / "README.md"
    md.write_text(
        "[ok](docs/b.md#part-one) [web](https://example.com) [self](#top)\n"
        "# Top\n"
        "[gone](docs/missing.md) [bad anchor](docs/b.md#part-two) ![img](docs/nope.png) `[code](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n```\n"
        "[out](../outside.md)\n"
        "[ref]: docs/also-missing.md\n",
        encoding="utf-8",
    )
    problems = broken_links(md, tmp_path)
    assert len(problems) == 5, problems
    for needle in ("docs/missing.md", "#part-two", "docs/nope.png", "outside the repository", "also-missing.md"):
        assert any(needle in p for p in problems), (needle, problems)
