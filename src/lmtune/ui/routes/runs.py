"""Training runs: the dry-run estimate, start, stop, resume, and what the page plots (TrainingRuns)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ...bundled import config_files
from ...config import load_config
from ...errors import LmtuneError
from ..requests import PREFERENCE_METHODS, RunRequest, TrainForm
from ..training import TrainingBusy
from ..workspace import UserError, Workspace, language, safe_name, workspace
from .data import is_preference_data

router = APIRouter()
Ws = Annotated[Workspace, Depends(workspace)]
# The form's settings and the `lmtune train` flags that set them.
FLAGS = {"model.name_or_path": "--model", "train.epochs": "--epochs", "train.learning_rate": "--learning-rate",
         "lora.r": "--lora.r", "data.val_size": "--val-size", "data.max_samples": "--max-samples",
         "data.question_field": "--data.question_field", "data.answer_field": "--data.answer_field",
         "data.messages_field": "--data.messages_field", "data.csv_delimiter": "--data.csv_delimiter",
         "train.method": "--train.method", "preference.beta": "--preference.beta",
         "preference.loss_type": "--preference.loss_type", "train.init_adapter": "--train.init_adapter"}


def training_settings(form: TrainForm, ws: Workspace) -> tuple[str, list[str], object]:
    """(run name, the flags of `lmtune train`, the config those flags give) from the page's form."""
    files = {p.stem: p for p in config_files()}
    if form.preset not in files:
        raise LmtuneError(f"unknown preset {form.preset!r}; choose one of {', '.join(files)}")
    paths = ws.data_paths(form.paths)
    preference = form.method in PREFERENCE_METHODS
    if not preference and is_preference_data(ws.source(form)):
        # LoRA would answer that it cannot tell the question column from the answer column, and the page would point
        # at its column fields; what is wrong is the method
        raise UserError("method_for_preferences", field="method")
    settings = {"model.name_or_path": ws.model(form.model), "train.epochs": form.epochs,
                "train.learning_rate": form.learning_rate, "lora.r": form.r, "data.val_size": form.val_size,
                "data.max_samples": form.max_samples, **form.source_settings(),
                # said only when it is not the preset's own, as a person would type it
                "train.method": form.method if form.method != load_config(files[form.preset]).train.method else None,
                # beta and loss_type mean nothing to LoRA, and loss_type nothing to ORPO and KTO: not passed on
                "preference.beta": form.beta if preference else None,
                "preference.loss_type": form.loss_type if form.method == "dpo" else None,
                "train.init_adapter": init_adapter(form.init_adapter, ws)}
    # Whole numbers stay whole (--epochs 30, not 30.0), as the page's inputs hold them and the command line reads them.
    settings = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in settings.items()
                if v not in (None, "")}
    flags = ["--config", str(files[form.preset]), "--data", *paths]
    for key, value in settings.items():
        flags += [FLAGS[key], str(value)]
    overrides = {**settings, "data.paths": paths}
    if "train.epochs" in settings:
        overrides["train.max_steps"] = -1  # as --epochs on the command line (cli._train_config)
    name = safe_name(form.name.strip() or f"run-{uuid.uuid4().hex[:6]}")
    return name, flags, load_config(files[form.preset], overrides)


def init_adapter(name: str, ws: Workspace) -> str | None:
    """The adapter folder of the run named to continue: a finished run of this page that wrote an adapter."""
    name = name.strip()
    if not name:
        return None
    try:
        run = ws.runs.find(name)
    except LmtuneError:
        raise UserError("bad_init_adapter", field="init_adapter", run=name) from None
    if not run.adapter:
        raise UserError("bad_init_adapter", field="init_adapter", run=name)
    return str(run.output_dir)


def busy(ws: Workspace) -> UserError:
    status = ws.runs.status()
    return UserError("train_running", 409, run=status.get("run"), step=status.get("step") or 0,
                     total=status.get("total_steps") or "?")


@router.post("/api/estimate")
def estimate(form: TrainForm, request: Request, ws: Ws):
    from ...training.train import train

    _, _, config = training_settings(form, ws)

    def work():
        lines = []
        result = train(config, dry_run=True, log=lines.append)
        return {**result.dry_run_estimate, "log": lines[-3:]}

    return ws.tasks.start("estimate", work, language(request))


@router.post("/api/train/start")
def start(form: TrainForm, ws: Ws):
    from ...model import resolve_source

    name, flags, config = training_settings(form, ws)
    resolve_source(config.model.name_or_path)  # a mistyped model: the CLI's message now, not after a start
    if ws.runs.running():
        raise busy(ws)
    existing = ws.runs.runs_dir / name
    if existing.exists() or (ws.runs.runs_dir / f"{name}.ui.json").exists():
        raise LmtuneError(f"{existing} already exists; choose another run name")
    try:
        ws.runs.start(name, flags)
    except TrainingBusy:  # another start won the race since the check above
        raise busy(ws) from None
    return ws.runs.status()


@router.post("/api/train/stop")
def stop(ws: Ws):
    if not ws.runs.stop():
        raise UserError("nothing_to_stop")
    return ws.runs.status()


@router.post("/api/train/resume")
def resume(body: RunRequest, ws: Ws):
    run = ws.runs.find(body.run)
    if ws.runs.running():
        raise busy(ws)
    if not run.resumable:
        raise UserError("nothing_to_resume")
    try:
        ws.runs.start(run.name, run.flags, resume=True)
    except TrainingBusy:
        raise busy(ws) from None
    return ws.runs.status()


@router.get("/api/train/status")
def train_status(ws: Ws, run: str | None = None):
    return ws.runs.status(run)


@router.get("/api/runs")
def runs(ws: Ws):
    return ws.runs.runs()
