"""`DataSource`: everything that decides which rows are read from a user's data and how.

Built once, where the settings come from (the command line and config file through `config.DataConfig`, the web
UI, a test), and handed whole to every reader of data: `data inspect`, `data clean`, training's data preparation and
`eval`. One value instead of a row of keyword arguments, so that a setting cannot be dropped on the way by one of
them (a `;` separator or a renamed messages column read by training but not by inspect).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class DataSource:
    # Files (jsonl, json, csv, tsv, txt, parquet), globs, or "hub:<dataset id>" entries.
    paths: tuple[str, ...] = ()
    # Explicit column names; empty means detect them (see readers.KNOWN_SCHEMAS).
    question_field: str = ""
    answer_field: str = ""
    context_field: str = ""
    # Conversation column (OpenAI `messages` or ShareGPT `conversations`); empty means detect.
    messages_field: str = ""
    # CSV separator: empty = read it off the header line (tab for .tsv files); one character, or "tab".
    csv_delimiter: str = ""
    # The prompt template ("auto", "plain", "chat") and the system message chat templates get.
    template: str = "auto"
    system_prompt: str = ""
    # Use the first N usable rows only (0 = all); the rows it leaves out are counted and said (LoadReport).
    max_samples: int = 0

    def __post_init__(self):
        # A single path given as text would otherwise be read as a sequence of one-letter paths.
        paths = (self.paths,) if isinstance(self.paths, str) else tuple(self.paths)
        object.__setattr__(self, "paths", paths)

    @classmethod
    def from_config(cls, data, paths: Iterable[str] | None = None) -> "DataSource":
        """The source a `config.DataConfig` (the YAML `data:` section after command-line overrides) describes;
        `paths` replaces its paths (e.g. its eval_paths)."""
        return cls(paths=tuple(data.paths if paths is None else paths), question_field=data.question_field,
                   answer_field=data.answer_field, context_field=data.context_field,
                   messages_field=data.messages_field, csv_delimiter=data.csv_delimiter, template=data.template,
                   system_prompt=data.system_prompt, max_samples=data.max_samples)

    @classmethod
    def of(cls, source: "DataSource | str | Iterable[str]") -> "DataSource":
        """A DataSource as given, or one that reads these paths with every setting detected."""
        return source if isinstance(source, DataSource) else cls(paths=source)

    def replace(self, **changes) -> "DataSource":
        return dataclasses.replace(self, **changes)

    def other_files(self, paths: Iterable[str]) -> "DataSource":
        """Other files read the same way, all of their rows (validation files beside the training files)."""
        return self.replace(paths=tuple(paths), max_samples=0)
