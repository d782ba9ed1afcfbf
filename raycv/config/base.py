"""What every config section shares: unknown keys are errors; the storage section."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Strict):
    endpoint_url: str | None = None
