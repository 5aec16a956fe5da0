"""Data: upload a file, inspect files as `lmtune data inspect` does, clean them as `lmtune data clean` does."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..requests import CleanRequest, InspectRequest
from ..workspace import UserError, Workspace, safe_name, size_text, workspace

router = APIRouter()
Ws = Annotated[Workspace, Depends(workspace)]


@router.post("/api/upload")
async def upload(request: Request, name: str, ws: Ws):
    """The body is the file. It is written as it arrives, and refused as soon as it passes the limit of one file
    or the room left in the upload folder (so many uploads in a row cannot fill the disk either)."""
    target = ws.folders["uploads"] / safe_name(name)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{id(request)}.partial")
    written = 0
    # what the folder holds already, uploads still arriving included (their partial files count as they grow)
    held = ws.uploads_size()
    try:
        with open(partial, "wb") as out:
            async for chunk in request.stream():
                written += len(chunk)
                if written > ws.max_upload_bytes:
                    raise UserError("upload_too_large", 413, name=target.name, size=size_text(ws.max_upload_bytes))
                if held + written > ws.max_uploads_bytes:
                    raise UserError("uploads_full", 413, size=size_text(ws.max_uploads_bytes))
                out.write(chunk)
        with ws.upload_lock:  # two uploads of one name get two files, as before (x, x-2)
            stem, suffix, n = target.stem, target.suffix, 1
            while target.exists():
                n += 1
                target = target.with_name(f"{stem}-{n}{suffix}")
            partial.rename(target)
    finally:
        partial.unlink(missing_ok=True)
    return {"path": str(target), "name": f"uploads/{target.name}"}


@router.post("/api/inspect")
def inspect(body: InspectRequest, ws: Ws):
    from ...data.inspect import inspect_data

    report = inspect_data(ws.source(body), model=ws.model(body.model), max_length=body.max_length)
    return report.to_dict()


@router.post("/api/clean")
def clean(body: CleanRequest, ws: Ws):
    from ...data.clean import clean_data

    source = ws.source(body)
    stem = "+".join(Path(p).stem for p in source.paths)[:80]
    output = ws.folders["clean"] / f"{safe_name(stem)}.clean.jsonl"
    report = clean_data(source, str(output), dedupe=body.dedupe, overwrite=True)
    rejects = []
    with open(report.rejects, encoding="utf-8") as f:
        for line in f:
            if len(rejects) >= 50:
                break
            rejects.append(json.loads(line))
    return {"output": report.output, "rows_read": report.rows_read, "kept": report.kept,
            "dropped": dict(report.dropped), "fixed": dict(report.fixed), "rejects": rejects,
            "summary": report.summary()}
