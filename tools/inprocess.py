"""Run the real client against the real server without a socket.

A ``requests`` transport adapter that hands each prepared request to a WSGI
app (through Werkzeug's test client) and wraps the answer as a
``requests.Response``: the client's encoding, retries, decoding and byte
counts all run unchanged, only the TCP hop is skipped. Evaluation uses it so
a sweep of thousands of queries takes seconds.
"""
from __future__ import annotations

import io
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPResponse


class WSGIAdapter(BaseAdapter):
    """Answers requests from ``app`` in-process."""

    def __init__(self, app: Any):
        super().__init__()
        self.client = app.test_client()

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        url = urlsplit(request.url or "")
        answer = self.client.open(url.path, method=request.method, query_string=url.query,
                                  headers=dict(request.headers), data=request.body or b"")
        response = requests.Response()
        response.status_code = answer.status_code
        response.reason = answer.status.split(" ", 1)[-1]
        response.headers = CaseInsensitiveDict(dict(answer.headers))
        # A urllib3 response over the bytes: the client streams and un-gzips it
        # exactly as it would from a socket.
        response.raw = HTTPResponse(body=io.BytesIO(answer.get_data()), headers=dict(answer.headers),
                                    status=answer.status_code, preload_content=False, decode_content=True)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        pass


def mount(session: requests.Session, app: Any, base_url: str = "http://enfpire.invalid") -> str:
    """Route ``base_url`` of ``session`` to ``app``; returns the URL to configure the client with."""
    session.mount(base_url, WSGIAdapter(app))
    return base_url
