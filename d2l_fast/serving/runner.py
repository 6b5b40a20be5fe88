"""Running the server: in the foreground (``d2l-fast serve``) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time


class BackgroundServer:
    """A real uvicorn server for ``app`` on ``host`` and a free port, in a daemon thread.

        with BackgroundServer(create_app(model)) as srv:
            client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, start_timeout: float = 60.0):
        import uvicorn

        self.app = app
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True,
                                        name="d2l-uvicorn")
        self._start_timeout = start_timeout

    def start(self) -> "BackgroundServer":
        self._thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited during start-up (see the log)")
            if time.monotonic() - t0 > self._start_timeout:
                raise TimeoutError(f"the server did not start within {self._start_timeout} s")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` in the foreground until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


__all__ = ["BackgroundServer", "serve"]
