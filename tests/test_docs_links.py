"""Every relative link in README.md and docs/*.md resolves to a file of the repository (and a same-page
anchor to a heading), and every docs/*.md path named in the requirements files, the sources and the
docs exists: a clone must not point at documents it does not ship."""
from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
DOC_PATH = re.compile(r"\bdocs/[\w.-]+\.md\b")


def _anchor(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: pathlib.Path) -> set[str]:
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def test_docs_exist():
    assert {p.name for p in PAGES} >= {"README.md", "operators.md", "architecture.md", "toolchain.md"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists() or ROOT not in resolved.parents and resolved != ROOT:
            bad.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            bad.append(f"{target} (no heading #{anchor} in {resolved.name})")
    assert not bad, f"{page.name}: unresolved links: {bad}"


def test_named_doc_paths_exist():
    sources = [*ROOT.glob("requirements*.txt"), *PAGES, *(ROOT / "src").rglob("*.py"), ROOT / "pyproject.toml"]
    missing = sorted({f"{s.relative_to(ROOT)}: {m}" for s in sources for m in DOC_PATH.findall(s.read_text())
                      if not (ROOT / m).exists()})
    assert not missing, f"paths to docs that do not exist: {missing}"
