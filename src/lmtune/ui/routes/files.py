"""Files: downloads of what the UI exported, removing an uploaded or cleaned file, and nothing else on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse

from ...data.clean import rejects_path
from ...errors import LmtuneError
from ..requests import FileRequest
from ..workspace import Workspace, workspace

router = APIRouter()
Ws = Annotated[Workspace, Depends(workspace)]


@router.get("/download/{path:path}")
def download(path: str, ws: Ws):
    target = (ws.workdir / path).resolve()
    if not target.is_relative_to(ws.folders["exports"]) or not target.is_file():
        raise LmtuneError(f"{path}: no such export")
    return FileResponse(target, filename=target.name, media_type="application/octet-stream")


@router.post("/api/files/remove")
def remove(body: FileRequest, ws: Ws):
    """An upload or a cleaned file the page lists (uploading one name again adds name-2, name-3: this is how the
    extra copies go); a cleaned file takes its rejects file with it. The bundled data stays."""
    target = Path(ws.data_path(body.path))
    if not any(target.parent == ws.folders[name] for name in ("uploads", "clean")):
        raise LmtuneError(f"{target.name}: the bundled data cannot be removed")
    target.unlink()
    if target.parent == ws.folders["clean"]:
        rejects_path(target).unlink(missing_ok=True)
    return {"datasets": ws.datasets()}
