"""Request bodies of the OpenAI-compatible endpoints (pydantic), plus our extras.

Unknown fields are refused (a typo must not be ignored), except OpenAI fields that change
nothing here at their neutral values. Extras (sent through the openai client's `extra_body`):
`memory_id` (which memory to read; default "default"), `top_k`, `retrieve` (false: read the
short-term memory only).
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    user: Optional[str] = None
    memory_id: Optional[str] = None
    retrieve: bool = True
    # OpenAI fields accepted at their neutral values only (checked in the app)
    frequency_penalty: Optional[float] = 0.0
    presence_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None


class MemoryCreate(_Strict):
    id: Optional[str] = None


class InjectRequest(_Strict):
    text: Optional[str] = None
    ids: Optional[list[int]] = None
    chunk_tokens: Optional[int] = Field(None, ge=1)
