"""The errors a request gets back: an HTTP status and OpenAI's error body
(`{"error": {"message", "type", "param", "code"}}`), raised anywhere in serve/ and written by api.py."""

from __future__ import annotations

from typing import Any

from loratool.errors import LoratoolError

# OpenAI's `type` per status, as its API words them (an unknown model and a wrong key are request errors
# there too, told apart by `code`); the openai client picks its exception by the status alone.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class ApiError(LoratoolError):
    """A refused or failed request: `status` is its HTTP status, `param` the request field it is about."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }
