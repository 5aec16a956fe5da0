"""Export: merge a run's adapter (`lmtune merge`) and write GGUF with an Ollama Modelfile (`lmtune export`); both
are slow, so each runs as a task the page polls."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..requests import ExportRequest, RunRequest
from ..workspace import Workspace, language, workspace

router = APIRouter()
Ws = Annotated[Workspace, Depends(workspace)]
TASKS = ("estimate", "evaluate", "merge", "export")


@router.post("/api/merge")
def merge_run(body: RunRequest, request: Request, ws: Ws):
    from ...export.merge import merge

    folder = ws.run_dir(body.run)
    output = ws.folders["runs"] / f"{body.run}-merged"

    def work():
        merge(str(folder), str(output), overwrite=True, log=lambda _: None)
        return {"path": str(output), "commands": [
            f'lmtune generate --model {output} --greedy --prompt "Học máy là gì?"',
            f"lmtune chat --model {output}",
            f"lmtune serve --model {output}"]}

    return ws.tasks.start("merge", work, language(request))


@router.post("/api/export")
def export(body: ExportRequest, request: Request, ws: Ws):
    from ...export.exporter import export_gguf

    name, quant = body.run, body.quant
    folder = ws.run_dir(name)
    output = ws.folders["exports"] / name / f"{name}-{quant}.gguf"

    def work():
        result = export_gguf(str(output), adapter=str(folder), quant=quant, ollama=True, overwrite=True,
                             name=name, log=lambda _: None)
        model_name = result.ollama_command.split()[-3] if result.ollama_command else name
        return {"path": result.path, "size_mb": round(result.size_bytes / 1e6, 1), "quant": quant,
                "download": f"/download/{output.relative_to(ws.workdir)}",
                "modelfile": f"/download/{Path(result.modelfile).relative_to(ws.workdir)}" if result.modelfile else None,
                "commands": [result.ollama_command, f"ollama run {model_name}", f"llama-cli -m {result.path} -cnv"]}

    return ws.tasks.start("export", work, language(request))


@router.get("/api/task/{kind}")
def task(kind: str, ws: Ws):
    return ws.tasks.get(kind)
