"""The gateway's refusal of a client request, shared by the HTTP API and the WebSocket."""

from __future__ import annotations


class ProtocolError(Exception):
    """A client request we cannot act on; `code` and message go back to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
