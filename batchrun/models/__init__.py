"""The model registry: one JSON data file per RunComfy model in this folder.

Adding a model is adding a file: its `model_id`, `input_schema` (valid JSON Schema), `price`,
which input fields hold image or video URLs, and the rules its API page states only in prose.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from batchrun.errors import BatchrunError

DEFAULT_MODEL = "kling/kling-3.0/standard/image-to-video"


class UnknownModel(BatchrunError):
    pass


@dataclass(frozen=True)
class Price:
    """USD per second of video, with and without audio, read from the fields the model names."""

    usd_per_second: float
    usd_per_second_with_audio: float
    duration_field: str = "duration"
    audio_field: str = "generate_audio"


@dataclass(frozen=True)
class Model:
    model_id: str
    title: str
    input_schema: dict[str, Any]
    price: Price
    url_fields: dict[str, list[str]]
    image_extensions: tuple[str, ...]
    rules: dict[str, Any]
    expected_seconds: float
    output_kind: str = "video"  # what its outputs must be: "video", "image" or "audio" (batchrun.media)

    def default(self, field: str) -> Any:
        return self.input_schema.get("properties", {}).get(field, {}).get("default")

    def video_seconds(self, job_input: dict[str, Any]) -> float:
        duration = job_input.get(self.price.duration_field, self.default(self.price.duration_field))
        return float(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else 0.0

    def estimate_cost(self, job_input: dict[str, Any], price: Price | None = None) -> float:
        """The cost RunComfy's price list gives for this input, in USD."""
        price = price or self.price
        audio = job_input.get(price.audio_field, self.default(price.audio_field))
        rate = price.usd_per_second_with_audio if audio else price.usd_per_second
        return round(self.video_seconds(job_input) * rate, 4)


def _from_data(data: dict[str, Any]) -> Model:
    return Model(
        model_id=data["model_id"],
        title=data.get("title", data["model_id"]),
        input_schema=data["input_schema"],
        price=Price(**data["price"]),
        url_fields=data.get("url_fields", {}),
        image_extensions=tuple(data.get("image_extensions", ())),
        rules=data.get("rules", {}),
        expected_seconds=float(data.get("expected_seconds", 90)),
        output_kind=data.get("output_kind", "video"),
    )


@functools.cache
def all_models() -> dict[str, Model]:
    models = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json"):
            model = _from_data(json.loads(entry.read_text(encoding="utf-8")))
            models[model.model_id] = model
    return models


def get_model(model_id: str) -> Model:
    """The registered model, or UnknownModel naming the ones batchrun knows."""
    models = all_models()
    if model_id not in models:
        known = ", ".join(sorted(models))
        raise UnknownModel(f"unknown model {model_id!r}; known models: {known}")
    return models[model_id]
