"""Request bodies of Label Studio's ML-backend protocol (label-studio-ml 2.x wire format).

Validation is lenient about keys we do not use (Label Studio adds fields between versions) and strict about
the ones we need. Tasks stay loosely typed here so that one malformed task fails alone, not the request.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from annoloop.model_store import DEFAULT_PROJECT


def project_key(project: Any) -> str:
    """Label Studio sends ``"<id>.<created timestamp>"``; models are kept per project id."""
    if project is None or project == "":
        return DEFAULT_PROJECT
    key = str(project).split(".", 1)[0].strip()
    return key if key.isdigit() else DEFAULT_PROJECT


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    project: str | int | None = None
    label_config: str = Field(alias="schema", min_length=1)


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tasks: list[Any]
    project: str | int | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None


class WebhookEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    action: str = Field(min_length=1)
