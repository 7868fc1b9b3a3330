"""The docs hold together: a short README, links that resolve, and no pointer outside the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
README_LIMIT = 15_000  # bytes: the rest lives in docs/, one page per topic


def repo_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        return [REPO / line for line in listed.splitlines() if (REPO / line).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk it, skipping venvs
        return [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_readme_is_short():
    assert (REPO / "README.md").stat().st_size <= README_LIMIT


def test_every_relative_link_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    assert len(pages) >= 9, "the docs pages exist"
    broken = []
    for page in pages:
        text = page.read_text()
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_nothing_points_outside_the_repository():
    # The design notes, the vLLM-on-CPU recipe and the peer survey behind this project are not
    # part of it: what the code cites lives in docs/ (design.md, vllm.md).
    forbidden = ("DESIGN" + ".md", "shared" + "/", "VLLM_CPU" + ".md", "PEERS" + ".md")
    hits = []
    for path in repo_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{path.relative_to(REPO)}: {word}" for word in forbidden if word in text]
    assert not hits, "\n".join(hits)
