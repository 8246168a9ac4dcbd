"""The README's links: every in-page anchor names a heading, every relative link an existing file."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_anchors_and_relative_links_resolve():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = page.read_text()
        slugs = {github_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            if path:
                assert (page.parent / path).exists(), f"{page.name}: link to missing '{path}'"
            elif anchor:
                assert anchor in slugs, f"{page.name}: anchor '#{anchor}' names no heading"


def test_slug_follows_github():
    assert github_slug("Set-up: two commands") == "set-up-two-commands"
    assert github_slug("Real data and real backbones (GPU machine with internet)") == \
        "real-data-and-real-backbones-gpu-machine-with-internet"
