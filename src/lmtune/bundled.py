"""Find the configs and dataset that ship with lmtune, in a source checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# In a wheel they are copied into the package (see pyproject.toml); in a checkout they sit at the repo root.
CANDIDATES = (PACKAGE_DIR / "_bundled", PACKAGE_DIR.parent.parent)

TRAIN_DATA = "data/vi_ai_qa.jsonl"
HELDOUT_DATA = "data/vi_ai_qa_heldout.jsonl"
# Two team-written rewordings of every training question, same answers (knowledge augmentation); none of them is a
# held-out question (tests/data/test_bundled_data.py checks it).
REWORDINGS_DATA = "data/vi_ai_qa_rewordings.jsonl"
# Two to six more rewordings of the 89 training questions that have a held-out rewording (none near it).
EXTRA_REWORDINGS_DATA = "data/vi_ai_qa_rewordings_extra.jsonl"
QUICKSTART_CONFIG = "configs/quickstart.yaml"
# Team-written preference pairs on the same topics (a good answer, and a small model's typical failure: a wrong fact,
# English, rambling, a vague non-answer), none of their prompts an SFT held-out question; and KTO rows made from them.
PREFERENCE_DATA = "data/vi_ai_preferences.jsonl"
PREFERENCE_HELDOUT_DATA = "data/vi_ai_preferences_heldout.jsonl"
KTO_DATA = "data/vi_ai_kto.jsonl"


def bundled_path(relative: str) -> Path:
    for root in CANDIDATES:
        if (root / relative).exists():
            return root / relative
    raise FileNotFoundError(f"bundled file {relative} is missing from this lmtune installation")


def config_files() -> list[Path]:
    return sorted(bundled_path("configs").glob("*.yaml"))
