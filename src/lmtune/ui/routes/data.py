"""Data: upload a file, inspect files as `lmtune data inspect` does, clean them as `lmtune data clean` does; both
take question/answer data and preference data (prompt, chosen, rejected; or prompt, completion, label), told apart
as the CLI tells them apart: by the first row's fields."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ...data.source import DataSource
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


def is_preference_data(source: DataSource) -> bool:
    """Whether the first row of the first file has preference fields (chosen/rejected, or completion/label): the
    test `lmtune data inspect` and `data clean` make before reading a file either way."""
    from ...data.preferences import preference_layout
    from ...data.readers import iter_records, resolve_paths

    for _, record in iter_records(resolve_paths(list(source.paths))[0], csv_delimiter=source.csv_delimiter):
        return isinstance(record, dict) and preference_layout(record) is not None
    return False


def preference_report(source: DataSource, model: str) -> dict:
    """`lmtune data inspect` on preference data: rows, pairs and unpaired answers, the length of each side (tokens
    with a model, else characters), each problem with its file and line, and the CLI's text report itself."""
    from dataclasses import asdict

    from ...data.inspect import LengthStats
    from ...data.preference_checks import format_preference_report, inspect_preferences

    tokenizer = None
    if model:
        from ...model import load_tokenizer, resolve_source

        tokenizer = load_tokenizer(resolve_source(model))
    report = inspect_preferences(list(source.paths), tokenizer, source.csv_delimiter)
    readable = [row for row in report.rows if row.example is not None]
    paired = sum(row.example.paired for row in readable)
    return {"kind": "preference", "files": report.files, "rows": len(report.rows), "pairs": paired,
            "unpaired": len(readable) - paired, "unit": report.unit,
            "lengths": {side: asdict(LengthStats.of(values)) for side, values in report.lengths.items()},
            "counts": report.counts(), "problems_total": len(report.problems),
            "problems": [{"where": r.where, "problem": r.problem, "detail": r.detail} for r in report.problems[:50]],
            "text": format_preference_report(report)}


@router.post("/api/inspect")
def inspect(body: InspectRequest, ws: Ws):
    from ...data.inspect import inspect_data

    source = ws.source(body)
    if is_preference_data(source):
        return preference_report(source, ws.model(body.model))
    report = inspect_data(source, model=ws.model(body.model), max_length=body.max_length)
    return {"kind": "qa", **report.to_dict()}


@router.post("/api/clean")
def clean(body: CleanRequest, ws: Ws):
    from ...data.clean import clean_data

    source = ws.source(body)
    stem = "+".join(Path(p).stem for p in source.paths)[:80]
    output = ws.folders["clean"] / f"{safe_name(stem)}.clean.jsonl"
    if is_preference_data(source):
        return clean_preference_data(source, output)
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


def clean_preference_data(source: DataSource, output: Path) -> dict:
    """`lmtune data clean` on preference data, answered as clean's report is: what it kept, dropped and why."""
    from collections import Counter

    from ...data.preference_checks import PROBLEMS, clean_preferences

    summary = clean_preferences(list(source.paths), str(output), overwrite=True, csv_delimiter=source.csv_delimiter)
    problem_of = {words: kind for kind, words in PROBLEMS.items()}  # the rejects file gives the reason in words
    rejects = []
    with open(output.with_name(output.stem + ".rejects.jsonl"), encoding="utf-8") as f:
        for line in f:
            reject = json.loads(line)
            rejects.append({**reject, "reason": problem_of.get(reject["reason"], reject["reason"])})
    with open(output, encoding="utf-8") as f:
        kept = sum(1 for line in f if line.strip())
    return {"output": str(output), "rows_read": kept + len(rejects), "kept": kept,
            "dropped": dict(Counter(r["reason"] for r in rejects)), "fixed": {}, "rejects": rejects[:50],
            "summary": summary}
