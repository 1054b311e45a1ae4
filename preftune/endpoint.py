"""The one endpoint type: a RunSpec field (strong/weak/judge), what the client sends to, what the
plan and the report price. Pydantic only, so the spec, the client and the UI form can all import it.

It holds where the key lives (an env var or a Prefect Secret block name), never the key: it can be
logged, written to provenance and shown in the UI.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema

from preftune.errors import UserError
from preftune.forms import empty_text_is_none, plain_optionals
from preftune.keys import note_secret_env


class Endpoint(BaseModel):
    """An OpenAI-compatible chat endpoint, or a local model folder that preftune serves itself."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=plain_optionals)

    @model_validator(mode="before")
    @classmethod
    def _empty_text_is_none(cls, data: Any) -> Any:
        """The form's empty text boxes (preftune.forms) mean "not given"."""
        return empty_text_is_none(cls, data)

    model: str = Field(min_length=1, description="Model name sent in each request, or a local Hugging Face "
                       "model folder (preftune serves it, continuously batched).")
    base_url: str | None = Field(None, description="Base URL of the OpenAI-compatible API, e.g. "
                                 "https://api.openai.com/v1. Empty: `model` is a local folder preftune serves.")
    api_key_env: str | None = Field(None, description="NAME of the environment variable holding the key; "
                                    "never the key itself.")
    api_key_block: str | None = Field(None, description="Name of a Prefect Secret block holding the key "
                                      "(read only when a request is sent).")
    api_key_file: SkipJsonSchema[str | None] = Field(
        None, exclude=True, description="Path of a file (mode 0600) holding the key of a server preftune started itself "
        "(a run's local model server, a deployment). Set by preftune; never on the form.")
    price_input_per_m: float | None = Field(None, ge=0, description="USD per 1M input (prompt) tokens. Empty: "
                                            "unpriced (a local folder is free).")
    price_output_per_m: float | None = Field(None, ge=0, description="USD per 1M output (completion) tokens. "
                                             "Empty: unpriced (a local folder is free).")
    cache_id: SkipJsonSchema[str | None] = Field(None, description="What identifies the model in the response cache instead "
                                 "of base_url (a local server's port changes between runs). Set by preftune.")
    # What preftune knows of a server it started itself (run-time only: never serialised, not on the form).
    concurrency: SkipJsonSchema[int | None] = Field(
        None, ge=1, exclude=True, description="Requests in flight the server handles at once (what it batches); "
        "the client's concurrency for this endpoint. Set by preftune for a local server.")
    server_pid: SkipJsonSchema[int | None] = Field(
        None, exclude=True, description="Process id of the local server preftune started for this endpoint: "
        "while it is alive and answering, a request is waited for, never timed out and sent again "
        "(preftune.client). Set by preftune.")

    @field_validator("api_key_env")
    @classmethod
    def _noted(cls, name: str | None) -> str | None:
        note_secret_env(name)  # from now on no child gets that variable and no reply keeps its value
        return name

    @classmethod
    def parse(cls, text: str, **fields: Any) -> Endpoint:
        """``MODEL@BASE_URL``, split at the last ``@`` followed by http(s):// (model names may hold
        ``@``); anything else is a local folder or bare model name. ``fields`` fill the rest."""
        model, base_url = text, None
        at = text.rfind("@")
        if at >= 0 and text[at + 1:].startswith(("http://", "https://")):
            model, base_url = text[:at], text[at + 1:].rstrip("/")
        if not model:
            raise UserError(f"endpoint {text!r}: expected MODEL@BASE_URL (e.g. gpt-4o-mini@https://api.openai.com/v1)"
                            " or a local model folder")
        return cls(model=model, base_url=base_url, **fields)

    @property
    def is_local(self) -> bool:
        return self.base_url is None

    def __str__(self) -> str:
        return self.model if self.base_url is None else f"{self.model}@{self.base_url}"

    def public(self) -> dict[str, Any]:
        """What provenance files may record (no key can be in here: the model holds none)."""
        return self.model_dump(exclude_none=True)

    def cost(self, prompt_tokens: float, completion_tokens: float) -> float | None:
        """USD for these tokens: THE per-token price rule (client usage, plan estimate, report).
        None when a remote endpoint has no price: unknown, not $0. One price given: the other is 0."""
        price_in, price_out = self.price_input_per_m, self.price_output_per_m
        if price_in is None and price_out is None:
            if not self.is_local:
                return None
            price_in = price_out = 0.0  # preftune serves a local folder itself: no per-token bill
        return (prompt_tokens * (price_in or 0.0) + completion_tokens * (price_out or 0.0)) / 1e6
