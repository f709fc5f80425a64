"""OpenAI-style errors: every failure the server reports is `{"error": {"message", "type",
"param", "code"}}` with an HTTP status that says what kind of failure it is."""
from __future__ import annotations


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_found(message: str, param: str | None = None) -> APIError:
    return APIError(404, message, param=param, code="not_found")


def busy(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full")


def too_large(message: str) -> APIError:
    return APIError(413, message, code="request_too_large")


def timed_out(message: str, status: int = 504) -> APIError:
    return APIError(status, message, type="timeout_error", code="timeout")
