"""What the sandbox knows about each model: its input schema, prose-only rules and price.

Read from batchrun's vendored model files (``batchrun/models/*.json``), never from client code.
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema


def input_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON of a model input: the key of ``Sandbox.posts_by_input``."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# What the sandbox bills where a model file's price is unknown (null).
SANDBOX_USD_PER_SECOND = 0.1
SANDBOX_USD_PER_OUTPUT = 0.05
SANDBOX_AUTO_SECONDS = 5.0


class Model:
    """A model the sandbox knows, loaded from one of batchrun's vendored model files."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.model_id: str = data["model_id"]
        self.schema: dict[str, Any] = data["input_schema"]
        # The API validates its own published "float" as a JSON Schema number.
        self.validator = jsonschema.Draft202012Validator(_numbers(self.schema))
        self.price: dict[str, Any] = data.get("price", {})
        self.sum_rules: list[dict[str, str]] = data.get("rules", {}).get("sum_equals", [])
        self.output_kind: str = data.get("output_kind", "video")

    def _default(self, *path: str) -> Any:
        node: Any = self.schema
        for key in path:
            node = node.get(key, {})
        return node if not isinstance(node, dict) else None

    def problems(self, body: Any) -> list[dict[str, Any]]:
        found = []
        for err in sorted(self.validator.iter_errors(body), key=lambda e: list(map(str, e.path))):
            loc = ["body", *err.absolute_path]
            if err.validator == "additionalProperties" and isinstance(err.instance, dict):
                # Point at each unknown key, as FastAPI-style APIs do, not at the enclosing object.
                known = err.schema.get("properties", {})
                for key in sorted(k for k in err.instance if k not in known):
                    found.append({"loc": [*loc, key], "msg": "extra inputs are not permitted",
                                  "type": "extra_forbidden"})
            else:
                found.append({"loc": loc, "msg": err.message, "type": err.validator})
        if found:
            return found
        # The one rule the schema states only in prose: segment durations add up to the total.
        for rule in self.sum_rules:
            items, field, total_key = rule["items"], rule["item_field"], rule["total"]
            if not body.get(items):
                continue
            each = self._default("properties", items, "items", "properties", field, "default")
            got = sum(item.get(field, each) for item in body[items])
            total = body.get(total_key, self._default("properties", total_key, "default"))
            if got != total:
                msg = f"the {field}s of {items} add up to {got}, but {total_key} is {total}"
                found.append({"loc": ["body", items], "msg": msg, "type": "sum_equals"})
        return found

    def catalogue_entry(self, with_schema: bool) -> dict[str, Any]:
        """This model as `GET /v1/models/{id}` gives it: the base price the sandbox bills (its own rate where
        the file's is unknown) and, published the way RunComfy's catalogue may, numbers typed ``"float"``."""
        price = self.price
        unit = price.get("unit", "second")
        base = price.get("usd_per_output" if unit == "output" else "usd_per_second")
        entry: dict[str, Any] = {
            "model_id": self.model_id,
            "output_kind": self.output_kind,
            "base_price_usd": base if base is not None else
            (SANDBOX_USD_PER_OUTPUT if unit == "output" else SANDBOX_USD_PER_SECOND),
            "price_unit": unit,
        }
        if with_schema:
            entry["input_schema"] = _published(self.schema)
        return entry

    def cost(self, body: dict[str, Any]) -> float:
        """What the job is billed: the file's price formula, with the sandbox's own rates where the model's
        are unknown (null), so the balance still goes down."""
        price = self.price
        props = self.schema.get("properties", {})

        def read(name: str | None) -> Any:
            return None if name is None else body.get(name, props.get(name, {}).get("default"))

        if price.get("unit") == "output":
            total = price.get("usd_per_output") or SANDBOX_USD_PER_OUTPUT
        else:
            audio_field = price.get("audio_field", "generate_audio")
            audio = audio_field is not None and bool(read(audio_field)) != price.get("audio_inverted", False)
            rate = price.get("usd_per_second_with_audio") if audio else None
            rate = rate or price.get("usd_per_second") or SANDBOX_USD_PER_SECOND
            value = read(price.get("duration_field", "duration"))
            try:  # no duration field, or "auto": the sandbox renders its default length
                seconds = SANDBOX_AUTO_SECONDS if value is None else float(value)
            except (TypeError, ValueError):
                seconds = SANDBOX_AUTO_SECONDS
            if price.get("duration_unit") == "ms":
                seconds /= 1000
            total = seconds * rate
        for name, table in price.get("multipliers", {}).items():
            value = read(name)
            total *= table.get(value if isinstance(value, str) else json.dumps(value), 1.0)
        return round(total, 6)


def _numbers(node: Any) -> Any:
    """A schema with ``"type": "float"`` read as ``"number"``."""
    if isinstance(node, dict):
        return {k: ("number" if k == "type" and v == "float" else _numbers(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v) for v in node]
    return node


def load_folder(folder: Path) -> dict[str, Model]:
    """The models of a user folder of model files (``BATCHRUN_MODELS``), keyed by id; files that are not
    model files are skipped (batchrun itself reports them)."""
    models = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("model_id"), str) \
                    and isinstance(data.get("input_schema"), dict):
                models[data["model_id"]] = Model(data)
        except (OSError, ValueError, TypeError, jsonschema.SchemaError):
            continue
    return models


def _published(node: Any) -> Any:
    """A schema as the catalogue may publish it: ``"type": "number"`` written ``"float"``."""
    if isinstance(node, dict):
        return {k: ("float" if k == "type" and v == "number" else _published(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_published(v) for v in node]
    return node


def _load_models() -> dict[str, Model]:
    """Every model file batchrun vendors, keyed by model id."""
    models = {}
    for entry in resources.files("batchrun").joinpath("models").iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            if "model_id" in data and "input_schema" in data:
                models[data["model_id"]] = Model(data)
    return models


MODELS = _load_models()
_DEFAULT_FILE = resources.files("batchrun").joinpath("models", "kling-3.0-standard-image-to-video.json")
MODEL_ID: str = json.loads(_DEFAULT_FILE.read_text("utf-8"))["model_id"]
