"""The bodies the page sends, as pydantic models: a wrong type or a value out of range is a 400 that names the
field (in the page's language, app.field_problem), checked before any work starts, never a 500.

The training form's numbers arrive as the text of the page's inputs ("30", "2e-4", or "" when left empty), so
those fields take text that reads as a number and treat "" as unset; the config then checks their ranges, with
the messages `lmtune train` gives for the same flags.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_NEW_TOKENS = 4096  # more than any model of the UI's size answers in one go; a bound against a typo's hour-long wait
SOURCE_FIELDS = ("question_field", "answer_field", "messages_field", "csv_delimiter")
QUANTS = ("q8_0", "f16", "f32", "bf16", "q4_k_m", "q5_k_m", "q6_k")
# The training methods the page offers (train.method): each writes an adapter, which the Try and Export pages take.
# "full" writes a whole model instead, which they do not, so it stays a command-line method.
METHODS = ("lora", "dpo", "orpo", "kto")
PREFERENCE_METHODS = ("dpo", "orpo", "kto")
LOSS_TYPES = ("sigmoid", "ipo", "simpo")  # preference.loss_type, DPO's only


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class DataRequest(_Body):
    paths: list[str] = Field(default_factory=list)
    # Columns and separator picked on the page, as train's data.question_field, data.answer_field,
    # data.messages_field and data.csv_delimiter (empty: detected).
    question_field: str = ""
    answer_field: str = ""
    messages_field: str = ""
    csv_delimiter: str = ""

    def source_settings(self) -> dict[str, str]:
        """The settings given, as config keys: what `lmtune train` gets as flags and the readers as a DataSource."""
        return {f"data.{name}": getattr(self, name).strip() for name in SOURCE_FIELDS if getattr(self, name).strip()}


class InspectRequest(DataRequest):
    model: str = ""
    max_length: int = Field(512, ge=2)


class CleanRequest(DataRequest):
    dedupe: Literal["exact", "near"] = "exact"


class TrainForm(DataRequest):
    preset: str = "quickstart"
    model: str = ""
    name: str = ""
    epochs: Optional[float] = None
    learning_rate: Optional[float] = None
    r: Optional[int] = None
    val_size: Optional[Union[int, float]] = None  # a share (0.1) or a number of rows (50), as data.val_size
    max_samples: Optional[int] = None
    method: Literal[METHODS] = "lora"
    # preference.beta (DPO, ORPO, KTO) and preference.loss_type (DPO); unset: the preset's.
    beta: Optional[float] = Field(None, gt=0)
    loss_type: Optional[Literal[LOSS_TYPES]] = None
    # The name of a finished run of this page whose adapter training continues (train.init_adapter); "": a new one.
    init_adapter: str = ""

    @field_validator("epochs", "learning_rate", "r", "val_size", "max_samples", "beta", "loss_type", mode="before")
    @classmethod
    def _empty_is_unset(cls, value):
        return None if isinstance(value, str) and not value.strip() else value


class RunRequest(_Body):
    run: str


class ChatTurn(_Body):
    role: Literal["user", "assistant"]
    content: str


class ChatRequest(RunRequest):
    side: Literal["base", "tuned"] = "tuned"
    messages: list[ChatTurn] = Field(min_length=1)
    greedy: bool = True
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)


class EvaluateRequest(RunRequest):
    data: str = ""
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)


class ExportRequest(RunRequest):
    quant: Literal[QUANTS] = "q8_0"


class FileRequest(_Body):
    path: str
