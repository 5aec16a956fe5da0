"""The README and docs/ pages: the generated configuration page is current, every relative link resolves inside
the repository, the README stays a front door, and no page talks about how lmtune was developed."""

from __future__ import annotations

import importlib.util
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 320

# Wording about the history of the project's own development: it means nothing to a user of the package.
HISTORY = [
    r"\bsessions? \d+",
    r"\b(this|last|previous|earlier|same|next) session",
    r"\blast time\b",
    r"\bmeasured last\b",
    r"\bwork periods?\b",
    r"\bissues? #?\d+",
    r"(?<![\w&/#])#\d+\b",  # "#13" named as a goal (not an HTML entity such as &#39;)
    r"\bthis project's (machine|cpu)",
]


def _configuration_doc():
    spec = importlib.util.spec_from_file_location("configuration_doc", ROOT / "scripts" / "configuration_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_generated_from_config_py():
    doc = _configuration_doc()
    current = doc.PAGE.read_text(encoding="utf-8") if doc.PAGE.exists() else ""
    assert current == doc.render(), (
        f"docs/configuration.md is out of date with src/lmtune/config.py; regenerate it with: {doc.COMMAND}")


def test_every_config_key_is_on_the_page_with_a_meaning():
    from lmtune.config import all_keys

    doc = _configuration_doc()
    assert doc.undocumented() == [], "write a comment above these fields in src/lmtune/config.py"
    page = doc.render()
    for key in all_keys():
        row = next((line for line in page.splitlines() if line.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{key} is missing from the configuration page"
        assert row.rstrip(" |").split(" | ")[-1].strip(), f"{key} has no meaning on the configuration page"


def test_field_comments_are_read_from_the_source():
    """The page's meanings come from the comments above (and beside) each field, not from a neighbour's."""
    doc = _configuration_doc()
    from lmtune.config import TrainConfig

    comments = doc.field_comments(TrainConfig)
    assert comments["batch_size"].startswith("per device")  # a comment at the end of the field's line
    assert comments["max_steps"].startswith("Stops after this many optimizer steps")  # the comment above it
    assert "batch_size x grad_accum" not in comments["learning_rate"]  # not the comment of the field before


@pytest.mark.parametrize("text", [
    "measured in session 7", "on this session's machine", "as measured last time", "the previous session measured",
    "Issue 13's goal", "the target of #13 is met", "in work period 3", "on this project's machine",
])
def test_history_patterns_catch_development_wording(text):
    assert any(re.search(p, text, re.IGNORECASE) for p in HISTORY)


@pytest.mark.parametrize("text", [
    "`lmtune serve` keeps one session per client", "the issue tracker", "&#39;", "step 37 of 120", "chrF 99.4",
])
def test_history_patterns_leave_ordinary_wording_alone(text):
    assert not any(re.search(p, text, re.IGNORECASE) for p in HISTORY)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history_in_the_docs(page):
    found = [f"{page.relative_to(ROOT)}:{number}: {match.group(0)!r}"
             for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
             for pattern in HISTORY for match in re.finditer(pattern, line, re.IGNORECASE)]
    assert not found, "wording about how lmtune was developed, not how to use it:\n" + "\n".join(found)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = "".join(c for c in unicodedata.normalize("NFC", text) if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    anchors: set[str] = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and (m := re.match(r"#{1,6} (.+)", line)):
            slug, n = _slug(m.group(1)), 1
            while slug in anchors:  # a repeated heading gets -1, -2, ...
                slug = f"{_slug(m.group(1))}-{n}"
                n += 1
            anchors.add(slug)
    return anchors


def _links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of every Markdown link and image outside code blocks and code spans."""
    links, in_code = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        links += [(number, m.group(1)) for m in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", line)]
    return links


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_of_the_repository(page):
    broken = []
    for number, target in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        file = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not file.is_relative_to(ROOT):
            broken.append(f"{where} (outside the repository)")
        elif not file.exists():
            broken.append(f"{where} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{where} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_a_page_names_exists(page):
    """A promise is only as good as its test: `tests/x.py::test_name` on a page must be a test of that file."""
    missing = []
    for file, name in re.findall(r"(tests/[\w/]+\.py)::(\w+)", page.read_text(encoding="utf-8")):
        path = ROOT / file
        if not path.is_file() or not re.search(rf"^\s*(async )?def {name}\(", path.read_text(encoding="utf-8"), re.M):
            missing.append(f"{file}::{name}")
    assert not missing, f"{page.relative_to(ROOT)} names tests that do not exist: {', '.join(missing)}"


def _cells(row: str) -> int:
    """Columns of a Markdown table row: pipes that are not escaped (`\\|`), less the outer two."""
    return len(re.findall(r"(?<!\\)\|", row.strip())) - 1


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_table_row_has_as_many_cells_as_its_header(page):
    """A row with a stray or missing pipe renders as a broken table on GitHub."""
    broken, header, in_code = [], None, False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        is_row = not in_code and line.lstrip().startswith("|")
        if not is_row:
            header = None
        elif header is None:
            header = _cells(line)
        elif _cells(line) != header:
            broken.append(f"{page.relative_to(ROOT)}:{number}: {_cells(line)} cells, the header has {header}")
    assert not broken, "\n".join(broken)


def test_the_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines; keep it at most {README_MAX_LINES} and move details to a page in docs/")
    text = "\n".join(lines)
    for command in ("./quickstart.sh", "./run-tests.sh"):
        assert command in text
    for page in PAGES:  # ../shared/ lies outside the repository: a reader of the package has no such folder
        assert "../shared" not in page.read_text(encoding="utf-8"), f"{page.relative_to(ROOT)} refers to ../shared"
