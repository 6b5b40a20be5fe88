"""The data viewer: browse generated training data and ``d2l-fast eval`` results in the browser.

    d2l-fast view runs/eval/                 # the viewer alone (no model), http://127.0.0.1:8001/view
    d2l-fast serve ... --data-dir runs/eval  # the document server, with the viewer at /view

``GET /view`` is the page (one self-contained file); ``GET /view/api/files`` lists the ``*.jsonl`` files under the
folder given at startup; ``GET /view/api/rows?file=&offset=&limit=&bin=&attribute=&method=`` pages through one.
Two kinds of file are understood: eval outputs (``samples.jsonl``, one line per sample and method, see
:mod:`d2l_fast.training.evaluate`) — shown one question per row with its methods side by side, joined to its
document when a ``records.jsonl`` sits in the same folder — and data records (``{"id", "context", "qas", "meta"}``,
see :mod:`d2l_fast.training.generators`). Files are only read inside the folder (a path leaving it is answered
400), through :mod:`d2l_fast.safe_io` with a size bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import threading
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse

from ..safe_io import read_text
from .errors import APIError, bad_request, not_found

MAX_FILE_BYTES = 512 << 20
MAX_FILES = 2000
MAX_LIMIT = 200
DOC_CHARS = 20000

router = APIRouter()


class DataViewer:
    """Reads the JSONL files under ``root`` for the viewer (parsed files cached by path, size and mtime)."""

    def __init__(self, root, *, max_file_bytes: int = MAX_FILE_BYTES):
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"DataViewer root must be a path, got {type(root).__name__}")
        if isinstance(max_file_bytes, bool) or not isinstance(max_file_bytes, int) or max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be a positive int, got {max_file_bytes!r}")
        p = pathlib.Path(root).expanduser()
        if not p.is_dir():
            raise ValueError(f"data folder {str(root)!r} {'is not a folder' if p.exists() else 'does not exist'}")
        self.root = p.resolve()
        self.max_file_bytes = max_file_bytes
        self._cache: dict[pathlib.Path, tuple[tuple, list]] = {}
        self._lock = threading.Lock()

    def files(self) -> list[dict]:
        out = []
        for path in sorted(self.root.rglob("*.jsonl")):
            if len(out) >= MAX_FILES:
                break
            if path.is_file() and path.resolve().is_relative_to(self.root):
                rel = path.relative_to(self.root).as_posix()
                out.append({"file": rel, "bytes": path.stat().st_size,
                            "kind": "samples" if path.name == "samples.jsonl" else "records"})
        return out

    def resolve(self, file: str) -> pathlib.Path:
        """The path of ``file`` (relative to the folder); 400 if it leaves the folder, 404 if it is not there."""
        if not isinstance(file, str) or not file or "\x00" in file:
            raise bad_request(f"'file' must be a path relative to the data folder, got {file!r}", "file")
        rel = pathlib.PurePosixPath(file.replace("\\", "/"))
        if rel.is_absolute() or ".." in rel.parts or rel.suffix != ".jsonl":
            raise bad_request(f"'file' must be a .jsonl path inside the data folder (no '..', not absolute), got "
                              f"{file!r}", "file")
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise bad_request(f"'file' {file!r} leads outside the data folder", "file")
        if not path.is_file():
            raise not_found(f"no file {file!r} in the data folder", "file")
        return path

    def lines(self, path: pathlib.Path) -> list:
        st = path.stat()
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._cache.get(path)
            if hit is not None and hit[0] == key:
                return hit[1]
        text = read_text(path, self.max_file_bytes, what="data file", error=bad_request)
        rows = []
        for ln, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise bad_request(f"{path.name}:{ln}: not valid JSON ({e.msg} at column {e.colno})") from None
        with self._lock:
            self._cache[path] = (key, rows)
        return rows

    def documents(self, folder: pathlib.Path) -> dict[str, dict]:
        """``{record_id: record}`` of ``records.jsonl`` next to an eval output (empty when there is none)."""
        path = folder / "records.jsonl"
        if not path.is_file():
            return {}
        return {rid: r for rid, r in _records(self.lines(path), path.stem)}

    def rows(self, file: str, *, offset: int = 0, limit: int = 20, bin: str | None = None,
             attribute: str | None = None, method: str | None = None) -> dict:
        """One page of ``file``'s rows (filtered): ``{"file", "kind", "total", "offset", "limit", "bins",
        "methods", "rows"}``; ``total`` counts the rows the filters keep."""
        path = self.resolve(file)
        attr = _attribute(attribute)
        raw = self.lines(path)
        if raw and all(isinstance(r, dict) and "sample_id" in r and "method" in r for r in raw):
            kind, items = "samples", _questions(raw, self.documents(path.parent))
        else:
            kind, items = "records", [_record_row(rid, r) for rid, r in _records(raw, path.stem)]
        bins = sorted({str(it["bin"]) for it in items if it.get("bin") is not None}, key=_bin_key)
        methods = sorted({m for it in items for m in it.get("methods", {})})
        if method is not None:
            if kind != "samples":
                raise bad_request(f"'method' filters eval outputs (samples.jsonl); {file!r} holds data records",
                                  "method")
            items = [dict(it, methods={method: it["methods"][method]}) for it in items if method in it["methods"]]
        if bin is not None:
            items = [it for it in items if str(it.get("bin")) == bin]
        if attr is not None:
            items = [it for it in items if _has(it, *attr)]
        page = items[offset:offset + limit]
        return {"file": file, "kind": kind, "total": len(items), "offset": offset, "limit": limit, "bins": bins,
                "methods": methods, "rows": page}


def _bin_key(label: str):
    head = label.split("-", 1)[0]
    return (0, int(head), label) if head.isdigit() else (1, 0, label)


def _attribute(attribute: str | None):
    if attribute is None:
        return None
    key, sep, value = attribute.partition("=")
    if not sep or not key.strip():
        raise bad_request(f"'attribute' must be 'key=value' (a field or meta key of the row), got {attribute!r}",
                          "attribute")
    return key.strip(), value.strip()


def _has(item: dict, key: str, value: str) -> bool:
    for where in (item, item.get("meta") or {}):
        if key in where:
            v = where[key]
            return (json.dumps(v) if not isinstance(v, str) else v) == value or str(v) == value
    return False


def _records(raw: list, stem: str):
    for ln, r in enumerate(raw, 1):
        if isinstance(r, dict):
            yield str(r.get("id", f"{stem}-{ln}")), r


def _bin_of(meta) -> str | None:
    b = (meta or {}).get("bin") if isinstance(meta, dict) else None
    if isinstance(b, list) and len(b) == 2:
        lo, hi = b
        return f"{lo}-{'inf' if hi is None or (isinstance(hi, float) and hi == float('inf')) else hi}"
    return None if b is None else str(b)


def _doc(text) -> dict:
    text = text if isinstance(text, str) else ""
    return {"document": text[:DOC_CHARS], "document_chars": len(text), "document_truncated": len(text) > DOC_CHARS}


def _record_row(rid: str, r: dict) -> dict:
    meta = r.get("meta") if isinstance(r.get("meta"), dict) else {}
    qas = [{"question": q.get("question"), "answers": q.get("answers")} for q in r.get("qas") or []
           if isinstance(q, dict)]
    return {"record_id": rid, "task": r.get("task", "qa"), "bin": _bin_of(meta), "meta": meta, "qas": qas,
            **_doc(r.get("context"))}


_SAMPLE_FIELDS = ("sample_id", "record_id", "method", "task", "question", "answers", "n_ctx_tokens", "bin")


def _questions(raw: list, docs: dict[str, dict]) -> list[dict]:
    """Eval rows grouped by question (first-seen order): the methods' predictions and scores side by side."""
    by_id: dict[str, dict] = {}
    for r in raw:
        sid = str(r["sample_id"])
        it = by_id.get(sid)
        if it is None:
            rid = str(r.get("record_id", ""))
            rec = docs.get(rid)
            meta = rec.get("meta") if rec is not None and isinstance(rec.get("meta"), dict) else {}
            it = by_id[sid] = {"sample_id": sid, "record_id": rid, "task": r.get("task"),
                               "question": r.get("question"), "answers": r.get("answers"),
                               "n_ctx_tokens": r.get("n_ctx_tokens"), "bin": r.get("bin"), "meta": meta,
                               "methods": {}, **(_doc(rec.get("context")) if rec is not None else {})}
        it["methods"][str(r["method"])] = {
            "prediction": r.get("prediction"),
            "scores": {k: v for k, v in r.items() if k not in _SAMPLE_FIELDS and k != "prediction"}}
    return list(by_id.values())


def viewer_of(request: Request) -> DataViewer:
    v = getattr(request.app.state, "viewer", None)
    if v is None:
        raise not_found("no data folder is served (start with --data-dir DIR or 'd2l-fast view DIR')")
    return v


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status)


@router.get("/view", include_in_schema=False)
async def view_page():
    page = resources.files("d2l_fast.serving").joinpath("static/viewer.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Cache-Control": "no-store"})


@router.get("/view/api/files")
async def view_files(request: Request):
    try:
        v = viewer_of(request)
        return {"root": v.root.name, "files": v.files()}
    except APIError as e:
        return _error(e)


def _int(value: str | None, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not lo <= int(value) <= hi:
        raise bad_request(f"'{name}' must be an integer in [{lo}, {hi}], got {value!r}", name)
    return int(value)


@router.get("/view/api/rows")
async def view_rows(request: Request, file: str | None = None, offset: str | None = None, limit: str | None = None,
                    bin: str | None = None, attribute: str | None = None, method: str | None = None):
    try:
        v = viewer_of(request)
        if file is None:
            raise bad_request("'file' is required (a path from /view/api/files)", "file")
        kw = {"offset": _int(offset, "offset", 0, 0, 10**9), "limit": _int(limit, "limit", 20, 1, MAX_LIMIT)}
        return await asyncio.to_thread(v.rows, file, bin=bin or None, attribute=attribute or None,
                                       method=method or None, **kw)
    except APIError as e:
        return _error(e)


def create_viewer_app(data_dir):
    """A FastAPI app serving only the viewer for ``data_dir`` (no model): ``d2l-fast view``."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    app = FastAPI(title="d2l_fast data viewer", docs_url=None, redoc_url=None)
    app.state.viewer = DataViewer(data_dir)
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def _root():
        return RedirectResponse("/view")

    return app


__all__ = ["DataViewer", "create_viewer_app", "router"]
