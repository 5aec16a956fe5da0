"""The tuned-vs-base tables of every evaluation report, as console text and as Markdown."""

from __future__ import annotations

# A table's rows: (what the row says, the figure's key, its format)
RowSpec = list[tuple[str, str, str]]


def comparison_rows(spec: RowSpec, tuned: dict, base: dict | None) -> list[list[str]]:
    """[name, tuned] or [name, tuned, base, tuned - base] per row of `spec`, from two models' figures."""
    rows = []
    for name, key, fmt in spec:
        t = tuned[key]
        row = [name, fmt.format(t)]
        if base is not None:
            b = base[key]
            row += [fmt.format(b), ("+" if t - b >= 0 else "") + fmt.format(t - b)]
        rows.append(row)
    return rows


def header(with_base: bool, minus: str = "-") -> list[str]:
    return ["metric", "tuned"] + (["base", f"tuned {minus} base"] if with_base else [])


def text_table(title: str, rows: list[list[str]], with_base: bool) -> str:
    """`title`, then the rows in aligned columns (names left, figures right)."""
    rows = [header(with_base)] + rows
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(rows[0]))]
    lines = [title]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]], with_base: bool) -> list[str]:
    head = header(with_base, "−")
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(row) + " |" for row in rows]
