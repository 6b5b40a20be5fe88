"""``d2l-fast view DIR``: the data viewer alone (no model): browse generated data and ``d2l-fast eval`` outputs
(see :mod:`d2l_fast.serving.viewer`) at ``http://HOST:PORT/view``."""

from __future__ import annotations

import pathlib

from ._common import CLIError

NAME = "view"


def add_parser(sub):
    vw = sub.add_parser(NAME, help="browse generated data and eval results (*.jsonl) in the browser")
    vw.add_argument("dir", help="folder of *.jsonl files (eval outputs: samples.jsonl + records.jsonl; data records)")
    vw.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    vw.add_argument("--port", type=int, default=8001, help="port to listen on (default: 8001)")
    vw.set_defaults(fn=run)
    return vw


def run(args) -> int:
    d = pathlib.Path(args.dir)
    if not d.is_dir():
        raise CLIError(f"{args.dir!r} {'is not a folder' if d.exists() else 'does not exist'}; expected a folder "
                       "of *.jsonl files")
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    try:
        import uvicorn
    except ImportError as e:
        raise CLIError(f"the viewer needs FastAPI and uvicorn ({e}): pip install 'd2l_fast[serve]'") from None
    from ..serving.viewer import create_viewer_app

    app = create_viewer_app(d)
    print(f"d2l-fast view: http://{args.host}:{args.port}/view", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
