"""A train/validation split that is deterministic and never leaks a question across the two sides.

Rows are grouped by their normalised question (NFC, case-folded, punctuation and whitespace
collapsed: `datatools.near_key`), so "AI là gì?" and "ai là gì ?" always land on the same side.
Groups are ordered by a seeded hash of that key, not by file order, so the split does not depend on
how the file was sorted and the same seed gives the same split on any machine.
"""

from __future__ import annotations

import hashlib

from ..errors import DataError
from .normalize import near_key
from .readers import Example


def _rank(key: str, seed: int) -> bytes:
    return hashlib.blake2b(f"{seed}\x1f{key}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def split_train_val(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """val_size < 1 is a fraction of the rows, >= 1 a number of rows (whole question groups, so about)."""
    if val_size <= 0:
        return examples, []
    target = round(val_size * len(examples)) if val_size < 1 else int(val_size)
    groups: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        groups.setdefault(near_key(example.question), []).append(index)
    if len(groups) < 2:
        raise DataError("data.val_size asks for a validation split, but every row has the same question")
    chosen: set[int] = set()
    for key in sorted(groups, key=lambda k: _rank(k, seed)):
        if len(chosen) >= max(1, target):
            break
        chosen.update(groups[key])
    if len(chosen) >= len(examples):
        raise DataError(f"data.val_size={val_size} leaves no rows to train on ({len(examples)} rows)")
    train = [e for i, e in enumerate(examples) if i not in chosen]
    val = [e for i, e in enumerate(examples) if i in chosen]
    if len(train) < len(val):  # 0.999 once trained on 1 row and spent minutes validating on 997
        raise DataError(f"data.val_size={val_size:g} holds out {len(val)} of {len(examples)} rows for validation and leaves "
                        f"{len(train)} to train on: validation should be the small side; use a share such as 0.1 "
                        f"or a number of rows below {len(examples) // 2}")
    return train, val


def leaked_questions(train: list[Example], val: list[Example]) -> int:
    """How many validation rows ask a question (normalised) that training also asks."""
    seen = {near_key(e.question) for e in train}
    return sum(near_key(e.question) in seen for e in val)
