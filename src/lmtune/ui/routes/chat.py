"""The Try page: one run's base and tuned model answer side by side (as `lmtune chat`), `lmtune eval` of both,
and the reports a run has."""

from __future__ import annotations

import json
import queue
import threading
import traceback
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ...bundled import HELDOUT_DATA, bundled_path
from ...config import GenerateConfig, load_yaml
from ...errors import LmtuneError
from ...outputs import CONFIG_FILE
from ...processes import unregister_cpu_user
from ...webguard import person_message
from ..requests import ChatRequest, EvaluateRequest
from ..workspace import UserError, Workspace, language, workspace

router = APIRouter()
Ws = Annotated[Workspace, Depends(workspace)]


def _generate_config(run_dir: Path, greedy: bool, max_new_tokens: int) -> GenerateConfig:
    section = (load_yaml(run_dir / CONFIG_FILE).get("generate") or {}) if (run_dir / CONFIG_FILE).is_file() else {}
    known = {k: v for k, v in section.items() if k in GenerateConfig.__dataclass_fields__}
    return GenerateConfig(**{**known, "greedy": greedy, "max_new_tokens": max_new_tokens})


@router.post("/api/chat")
def chat(body: ChatRequest, ws: Ws):
    from ...inference.batching import context_length, run_batch
    from ...inference.chat import answer_reserve, answer_row, fit_conversation

    messages = body.messages
    # The conversation alternates user, assistant, ..., user: the last turn is the question to answer.
    if messages[-1].role != "user" or any(m.role != ("user" if i % 2 == 0 else "assistant")
                                          for i, m in enumerate(messages)):
        raise UserError("bad_turns", field="messages")
    question = messages[-1].content.strip()
    if not question:
        raise LmtuneError("the question is empty: type a question")
    history = [(q.content, a.content) for q, a in zip(messages[:-1:2], messages[1:-1:2])]
    folder = ws.run_dir(body.run)
    cfg = _generate_config(folder, body.greedy, body.max_new_tokens)
    side = body.side
    pieces: queue.Queue = queue.Queue()
    state: dict = {}

    def work():
        try:
            loaded = ws.models.get(folder, side, cfg.compile, cfg.engine)
            unregister_cpu_user()  # loading registered the UI as computing; it answers for a moment only
            context = context_length(loaded)
            ids, dropped = fit_conversation(loaded, history, question, context - answer_reserve(cfg, context))
            if ids is None:
                raise LmtuneError(f"the message is too long for this model's context of {context} tokens; shorten it")
            row = answer_row(cfg, ids, context - len(ids), lambda piece: pieces.put({"text": piece}))
            state["row"] = row
            pieces.put({"dropped": dropped} if dropped else {"started": True})
            run_batch(loaded, [row])
            pieces.put({"done": True, "finish": row.finish_reason})
        except Exception as e:  # noqa: BLE001 - streamed to the page as the CLI's one line
            if not isinstance(e, LmtuneError):
                traceback.print_exc()
            pieces.put({"error": person_message(e)})

    def stream():
        threading.Thread(target=work, name=f"lmtune-ui-chat-{side}", daemon=True).start()
        try:
            while True:
                item = pieces.get()
                yield json.dumps(item, ensure_ascii=False) + "\n"
                if "done" in item or "error" in item:
                    return
        finally:  # the page went away: stop generating after the current token
            if "row" in state:
                state["row"].cancelled.set()

    return StreamingResponse(stream(), media_type="application/x-ndjson")


@router.get("/api/report")
def report(run: str, ws: Ws):
    folder = ws.run_dir(run)
    found = []
    for kind, where in (("vs_base", ws.folders["eval"] / run), ("validation", folder / "eval")):
        if (where / "report.json").is_file():
            predictions = []
            with open(where / "predictions.jsonl", encoding="utf-8") as f:
                for line in f:
                    predictions.append(json.loads(line))
                    if len(predictions) >= 30:
                        break
            found.append({"kind": kind, "report": json.loads((where / "report.json").read_text(encoding="utf-8")),
                          "predictions": predictions})
    return {"reports": found}


@router.post("/api/evaluate")
def evaluate(body: EvaluateRequest, request: Request, ws: Ws):
    from ...evaluation.evaluate import run_eval
    from ...model import base_model_of_adapter

    folder = ws.run_dir(body.run)
    data = ws.data_path(body.data or str(bundled_path(HELDOUT_DATA)))
    output = ws.folders["eval"] / body.run

    def work():
        run_eval([data], str(output), adapter=str(folder), baseline=base_model_of_adapter(folder),
                 max_new_tokens=body.max_new_tokens, overwrite=True, log=lambda _: None)
        return {"run": body.run}

    return ws.tasks.start("evaluate", work, language(request))
