"""Write docs/configuration.md from src/lmtune/config.py: every config key with its type, default and meaning.

    .venv/bin/python scripts/configuration_doc.py            # rewrite docs/configuration.md
    .venv/bin/python scripts/configuration_doc.py --check    # exit 1 if the page is out of date

The keys, types and defaults are read from the dataclasses themselves (`config.SECTIONS`, `dataclasses.fields`),
so a new field appears without touching this script. The meaning is the comment written in config.py: the
comment lines directly above a field, plus a comment at the end of its line. Each field has its own: a comment
shared by the fields below it could not say where it stops applying when a field is added among them. Reading
comments rather than `metadata={"help": ...}` keeps config.py as it reads best for its own maintainers;
tests/test_docs.py fails when the page differs from what this script writes, and when a field has no comment.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import re
import sys
import textwrap
import tokenize
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"
COMMAND = ".venv/bin/python scripts/configuration_doc.py"


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment that documents it in the class's source ("" when there is none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    # Comments by line number, and whether each stands alone on its line (a block comment) or ends a statement.
    comments: dict[int, tuple[str, bool]] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row = token.start[0]
            alone = lines[row - 1].lstrip().startswith("#")
            comments[row] = (token.string.lstrip("#").strip(), alone)
    meanings: dict[str, str] = {}
    for statement in ast.parse(source).body[0].body:
        if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
            continue
        block: list[str] = []
        row = statement.lineno - 1
        while row in comments and comments[row][1]:
            block.insert(0, comments[row][0])
            row -= 1
        inline = [comments[r][0] for r in range(statement.lineno, statement.end_lineno + 1)
                  if r in comments and not comments[r][1]]
        meanings[statement.target.id] = " ".join(block + inline)
    return meanings


def type_text(annotation: Any) -> str:
    """A field's type as a reader of a YAML file needs it."""
    origin = get_origin(annotation)
    if origin is Literal:
        return " / ".join(f"`{value}`" for value in get_args(annotation))
    if origin is Union:
        return " or ".join(type_text(option) for option in get_args(annotation))
    if origin is list:
        (item,) = get_args(annotation)
        return f"list of {type_text(item)}"
    return {str: "text", int: "integer", float: "number", bool: "true/false"}.get(annotation, str(annotation))


def default_text(f: dataclasses.Field) -> str:
    """The default as it would be written in a YAML file."""
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    return f"`{yaml_value(value)}`"


def yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def cell(text: str) -> str:
    """Text safe in a Markdown table cell: pipes escaped everywhere, angle brackets outside code spans (GitHub
    would read `<output_dir>` as an HTML tag and drop it)."""
    parts = text.replace("|", "\\|").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def render() -> str:
    from lmtune import config

    out = [
        "# Configuration",
        "",
        f"<!-- Generated from src/lmtune/config.py by scripts/configuration_doc.py; do not edit by hand. Regenerate with: {COMMAND} -->",
        "",
        "Every setting of lmtune, by section. A YAML file (`--config my.yaml`) sets them by section:",
        "",
        "```yaml",
        "lora:",
        "  r: 16",
        "train:",
        "  learning_rate: 1.0e-4",
        "```",
        "",
        "and the command line overrides any of them as `--section.field VALUE`, or `--field VALUE` when no other "
        "section has a field of that name (`--lora.r 16`, `--learning-rate 1e-4`; `-` and `_` are the same). "
        "Unknown keys are refused with the closest valid name, and every problem is reported at once. "
        "`lmtune train --help` lists the keys too.",
        "",
    ]
    if config.ALIASES:
        aliases = ", ".join(f"`{alias}` for `{key}`" for alias, key in config.ALIASES.items())
        out += [f"Also accepted: {aliases}.", ""]
    for section, cls in config.SECTIONS.items():
        hints = typing.get_type_hints(cls)
        meanings = field_comments(cls)
        out += [f"## {section}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            out.append(f"| `{section}.{f.name}` | {cell(type_text(hints[f.name]))} | {cell(default_text(f))} "
                       f"| {cell(meanings.get(f.name, ''))} |")
        out.append("")
    return "\n".join(out)


def undocumented() -> list[str]:
    """Keys whose field has no comment in config.py."""
    from lmtune import config

    return [f"{section}.{name}" for section, cls in config.SECTIONS.items()
            for name, meaning in field_comments(cls).items() if not meaning]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date; regenerate it with: {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)}")
    if missing := undocumented():
        print(f"note: no comment in src/lmtune/config.py for {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
