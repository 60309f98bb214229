"""The model registry: one JSON data file per RunComfy model, shipped in this folder, plus a user folder.

A data file's format and its load-time checks: `batchrun.models.dataformat`; the price formula:
`batchrun.models.pricing`. A user folder of data files (manifest key ``models_dir`` or the environment
variable ``BATCHRUN_MODELS``) adds models or overrides a shipped file with the same ``model_id``; its files
pass the same checks.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchrun.errors import BatchrunError
from batchrun.models.dataformat import ModelFileError, read_model_file
from batchrun.models.pricing import Price, estimate, seconds_of

__all__ = ["DEFAULT_MODEL", "ENV_VAR", "Model", "ModelFileError", "Price", "UnknownModel", "all_models", "get_model"]

DEFAULT_MODEL = "kling/kling-3.0/standard/image-to-video"
ENV_VAR = "BATCHRUN_MODELS"


class UnknownModel(BatchrunError):
    pass


@dataclass(frozen=True)
class Model:
    model_id: str
    title: str
    input_schema: dict[str, Any]
    price: Price
    url_fields: dict[str, list[str]]  # media kind -> field paths (``images[]``, ``elements[].video_url``)
    image_extensions: tuple[str, ...]
    rules: dict[str, Any]
    expected_seconds: float
    output_kind: str = "video"  # what its outputs must be: "video", "image" or "audio" (batchrun.media)
    max_outputs: int = 1
    source: str = ""
    prose_rules: tuple[str, ...] = ()
    origin: str = "shipped"  # "shipped", or the user folder's file it came from

    def default(self, field: str) -> Any:
        return self.input_schema.get("properties", {}).get(field, {}).get("default")

    def defaults(self) -> dict[str, Any]:
        return {name: spec["default"] for name, spec in self.input_schema.get("properties", {}).items()
                if isinstance(spec, dict) and "default" in spec}

    def video_seconds(self, job_input: dict[str, Any]) -> float:
        """Seconds of output the job asks for (0 when the model has no duration field or it says "auto")."""
        name = self.price.duration_field
        if name is None:
            return 0.0
        return seconds_of(job_input.get(name, self.default(name)), self.price.duration_unit) or 0.0

    def estimate_cost(self, job_input: dict[str, Any], price: Price | None = None) -> float | None:
        """The cost in USD the price formula gives for this input, or None when the price is unknown."""
        return estimate(price or self.price, job_input, self._defaults)

    @functools.cached_property
    def _defaults(self) -> Mapping[str, Any]:
        # `defaults()` walks the schema: once per model, not once per job and estimate (a 100,000-job
        # plan asks for several estimates per job). Read-only, as it is shared.
        return MappingProxyType(self.defaults())


def _model(fields: dict[str, Any], origin: str) -> Model:
    return Model(**fields, origin=origin)


@functools.cache
def _shipped() -> dict[str, Model]:
    models = {}
    for entry in resources.files(__name__).iterdir():
        if entry.name.endswith(".json"):
            model = _model(read_model_file(entry, f"batchrun/models/{entry.name}"), "shipped")
            models[model.model_id] = model
    return models


def user_dir(setting: str | Path | None = None) -> Path | None:
    """The user folder of model files: `setting` (the manifest's ``models_dir``), else $BATCHRUN_MODELS."""
    value = setting if setting not in (None, "") else os.environ.get(ENV_VAR) or None
    return Path(value).expanduser() if value is not None else None


def _user(folder: Path) -> dict[str, Model]:
    if not folder.is_dir():
        raise ModelFileError(f"models folder {folder}: is not a folder")
    models = {}
    for path in sorted(folder.glob("*.json")):
        model = _model(read_model_file(path), str(path))
        models[model.model_id] = model
    return models


def all_models(folder: str | Path | None = None, *, missing_ok: bool = False) -> dict[str, Model]:
    """Every model by id: the shipped ones, then the user folder's (see `user_dir`), which win.

    Raises ModelFileError for a data file that fails its checks, or for a user folder that does not
    exist (unless `missing_ok`: `models pull` creates it).
    """
    models = dict(_shipped())
    where = user_dir(folder)
    if where is not None and not (missing_ok and not where.exists()):
        models.update(_user(where))
    return models


def get_model(model_id: str, folder: str | Path | None = None) -> Model:
    """The registered model, or UnknownModel naming the ones batchrun knows."""
    models = all_models(folder)
    if model_id not in models:
        close = difflib.get_close_matches(model_id, list(models), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownModel(f"unknown model {model_id!r}{hint}; `batchrun models list` shows the {len(models)} "
                           "known models")
    return models[model_id]
