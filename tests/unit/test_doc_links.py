"""The documentation's relative links resolve, and nothing points outside the repository.

Every markdown link and image, `[text](target)` / `![alt](target)`, in the README, `docs/`, the benchmark
results and the pack and model READMEs must name a file or folder that exists relative to the document (web
links, mailto: and same-page `#anchors` are skipped; a `#fragment` on a markdown target must name one of its
headings). And no document or source file may point at the project's private background notes: docs explain
the method in their own words.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())  # wherever tests/ nests it
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
SKIP_PREFIXES = ("http://", "https://", "mailto:", "#")
# Built from parts so that this file does not name them itself.
FORBIDDEN = ("METHOD" + ".md", "DIT_" + "ZOO.md", "../" + "shared", "/work/" + "shared")


def documents() -> list[Path]:
    found = [REPO / "README.md", REPO / "benchmarks" / "RESULTS.md", REPO / "comfyui_nodes" / "README.md"]
    found += sorted((REPO / "docs").glob("*.md"))
    found += sorted((REPO / "benchmarks" / "archive").glob("*.md"))
    found += sorted((REPO / "reference_models").glob("*/README.md"))
    return [p for p in found if p.is_file()]


def links(text: str) -> list[str]:
    """Link and image targets of a markdown text, outside code blocks and inline code."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    return LINK.findall(prose)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text (lower case, punctuation dropped, spaces to
    hyphens; repeats get -1, -2, ...)."""
    anchors: set[str] = set()
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower().replace("`", "")).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


def broken_links(doc: Path) -> list[str]:
    problems = []
    for target in links(doc.read_text(encoding="utf-8")):
        if target.startswith(SKIP_PREFIXES):
            continue
        path_part, _, fragment = target.partition("#")
        resolved = (doc.parent / unquote(path_part)).resolve()
        if not resolved.exists():
            problems.append(f"{doc.relative_to(REPO)}: {target} (no such file: {resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in heading_anchors(resolved.read_text("utf-8")):
            problems.append(f"{doc.relative_to(REPO)}: {target} (no heading '#{fragment}' in {resolved.name})")
    return problems


def test_the_documents_exist():
    names = {p.relative_to(REPO).as_posix() for p in documents()}
    expected = {"README.md", "benchmarks/RESULTS.md", "docs/method.md", "docs/architecture.md", "docs/kernels.md",
                "docs/checkpoint-format.md", "docs/mixed-precision.md", "docs/comfyui.md", "docs/gradio.md"}
    assert expected <= names


def test_readme_is_a_front_page_under_10_kb():
    size = (REPO / "README.md").stat().st_size
    assert size < 10 * 1024, f"README.md is {size} bytes; move detail to docs/ and keep the front page under 10 KB"


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(doc):
    problems = broken_links(doc)
    assert not problems, "broken links:\n  " + "\n  ".join(problems)


def test_a_broken_link_is_caught(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.REPO", tmp_path)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "ok.md").write_text("# Title\n## Some part\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text("[fine](ok.md) [anchor](ok.md#some-part) [web](https://example.com) [self](#x)\n"
                   "![gone](missing.png) [bad anchor](ok.md#nowhere)\n"
                   "`[in code](nothing.md)`\n```\n[in a block](nothing.md)\n```\n")
    problems = broken_links(doc)
    assert len(problems) == 2 and "missing.png" in problems[0] and "#nowhere" in problems[1]


def source_and_doc_files() -> list[Path]:
    files = []
    for pattern in ("*.py", "*.md"):
        for path in REPO.rglob(pattern):
            parts = path.relative_to(REPO).parts
            if any(part.startswith(".") or part in ("node_modules", "__pycache__") for part in parts):
                continue  # .venv, .git, caches
            files.append(path)
    return files


def test_nothing_points_outside_the_repository():
    offenders = [f"{path.relative_to(REPO)}: names {name}" for path in source_and_doc_files()
                 for name in FORBIDDEN if name in path.read_text(encoding="utf-8", errors="replace")]
    assert not offenders, ("explain it in the project's own words (docs/method.md) instead of pointing at notes "
                           "outside the repository:\n  " + "\n  ".join(offenders))
