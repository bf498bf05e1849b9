"""A loopback HTTP server for download tests: serves bytes by path, honours Range, can cut transfers short,
answer a resume at the wrong offset, and send other headers than the true ones."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class LoopbackServer:
    """Files served at ``url(path)``.

    ``cut[path] = n`` ends the next response for ``path`` after n bytes; ``shift[path] = k`` answers
    a Range request for byte s with a 206 that starts at byte s - k instead (its Content-Range
    telling the truth about what is sent); ``headers[path]`` replaces headers of every answer for
    ``path`` (a value of None leaves that header out).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: dict[str, int] = {}
        self.shift: dict[str, int] = {}
        self.headers: dict[str, dict[str, str | None]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _answer(self, path: str, status: int, headers: dict[str, str | None]) -> None:
                self.send_response(status)
                headers.update(server.headers.get(path, {}))
                for name, value in headers.items():
                    if value is not None:
                        self.send_header(name, value)
                self.end_headers()

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.lstrip("/")
                server.requests.append((path, self.headers.get("Range")))
                body = server.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                header = self.headers.get("Range")
                if header and not server.ignore_range:
                    start = int(header.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self._answer(path, 416, {"Content-Range": f"bytes */{len(body)}"})
                        return
                    start = max(0, min(len(body) - 1, start - server.shift.get(path, 0)))
                    status = 206
                    headers = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
                else:
                    status, headers = 200, {}
                headers["Content-Length"] = str(len(body) - start)
                self._answer(path, status, headers)
                chunk = body[start:]
                limit = server.cut.pop(path, None)
                try:
                    self.wfile.write(chunk if limit is None else chunk[:limit])
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: fine
                    self.close_connection = True
                if limit is not None:
                    self.close_connection = True

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{path}"

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def http_server():
    with LoopbackServer() as server:
        yield server
