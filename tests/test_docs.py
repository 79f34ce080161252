"""The repository stands alone: its docs link only files that exist in it, and nothing points at
notes outside a clone or at a tracker's issue numbers."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ""}
SKIPPED = {".git", ".venv", ".venv-vllm", "runs", "build", "dist", "__pycache__", ".pytest_cache", "data"}
# split so that this file does not match itself
OUTSIDE = re.compile("METHOD" + r"\.md|\.\./" + "shared")
ISSUE_NUMBER = re.compile(r"\b[Ii]ssue[ -]?\d+|\bitem \d+ of the issue")


def repository_text_files():
    for path in REPO.rglob("*"):
        if path.is_file() and path.suffix in TEXT_SUFFIXES and not SKIPPED & set(path.relative_to(REPO).parts):
            yield path


def test_nothing_points_outside_the_clone_or_at_issue_numbers():
    offenders = []
    for path in repository_text_files():
        text = path.read_text(errors="replace")
        for pattern in (OUTSIDE, ISSUE_NUMBER):
            offenders += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in pattern.finditer(text)]
    assert offenders == []


def test_markdown_links_resolve():
    pages = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "experiments").glob("*/README.md")]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not target.startswith(("http://", "https://")) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert len(pages) >= 6 and broken == []
