"""Files: downloads of what the UI exported, and nothing else on disk."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from ...errors import LmtuneError
from ..workspace import Workspace, workspace

router = APIRouter()
Ws = Annotated[Workspace, Depends(workspace)]


@router.get("/download/{path:path}")
def download(path: str, ws: Ws):
    target = (ws.workdir / path).resolve()
    if not target.is_relative_to(ws.folders["exports"]) or not target.is_file():
        raise LmtuneError(f"{path}: no such export")
    return FileResponse(target, filename=target.name, media_type="application/octet-stream")
