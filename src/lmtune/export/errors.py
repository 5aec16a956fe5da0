"""The export stage's error, shared by the writer, the vocabulary and the exporter."""

from __future__ import annotations

from ..errors import LmtuneError


class ExportError(LmtuneError):
    """The model cannot be exported (unsupported architecture, tokenizer, quant type) or failed its check."""
