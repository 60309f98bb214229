"""The API's model catalogue: `GET /v1/models/{model_id}` made into a data file, and compared with one.

An entry holds ``model_id``, ``input_schema`` (as published: ``"float"`` types, RunComfy's media formats),
``base_price_usd`` and ``price_unit`` ("second" or "output"), and may hold ``output_kind``. It lacks what
only people write down (prose rules, the duration and audio fields of the price, multipliers), so a pulled
file keeps those keys from the local file of the same id (the "overlay"). Fields of the published schema
that batchrun does not know are kept as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from batchrun.errors import BatchrunError
from batchrun.models.dataformat import read_model_data

# Keys of a local data file that a catalogue entry does not carry and a pull keeps.
OVERLAY_KEYS = ("title", "source", "page_url", "expected_seconds", "max_outputs", "url_fields", "image_extensions",
                "rules", "prose_rules", "example_input")
PRICE_OVERLAY_KEYS = ("usd_per_second_with_audio", "duration_field", "duration_unit", "audio_field",
                      "audio_inverted", "multipliers")


class CatalogueError(BatchrunError):
    """A catalogue entry that cannot be made into a data file."""


def data_from_entry(entry: dict[str, Any], overlay: dict[str, Any] | None, base_url: str) -> dict[str, Any]:
    """A data file's JSON for a catalogue `entry`, keeping `overlay`'s hand-written keys (the local file's)."""
    overlay = overlay or {}
    model_id = entry.get("model_id")
    schema = entry.get("input_schema")
    if not isinstance(model_id, str) or not isinstance(schema, dict):
        raise CatalogueError("the catalogue entry has no model_id or no input_schema")
    unit = entry.get("price_unit", "second")
    base = entry.get("base_price_usd")
    local_price = overlay.get("price") or {}
    price: dict[str, Any] = {k: local_price[k] for k in PRICE_OVERLAY_KEYS if k in local_price}
    price["unit"] = unit
    if unit == "output":
        price["usd_per_output"] = base
        price.setdefault("duration_field", None)
        price.setdefault("audio_field", None)
    else:
        price["usd_per_second"] = base
        props = schema.get("properties") or {}
        price.setdefault("duration_field", "duration" if "duration" in props else None)
        price.setdefault("audio_field", next((a for a in ("generate_audio", "sound", "enable_audio") if a in props),
                                             None))
        if price.get("usd_per_second_with_audio") is not None and local_price.get("usd_per_second"):
            # The catalogue gives one base rate: the audio rate keeps its local ratio to it.
            ratio = price["usd_per_second_with_audio"] / local_price["usd_per_second"]
            price["usd_per_second_with_audio"] = None if base is None else round(base * ratio, 6)
    data: dict[str, Any] = {"model_id": model_id}
    data.update({k: overlay[k] for k in OVERLAY_KEYS if k in overlay})
    data["source"] = f"GET {base_url.rstrip('/')}/v1/models/{model_id}"
    data["output_kind"] = entry.get("output_kind") or overlay.get("output_kind", "video")
    data["price"] = price
    data["input_schema"] = schema
    return data


def file_name(model_id: str) -> str:
    """The data file's name for a model id: ``kling__kling-3.0__pro__text-to-video.json``."""
    return model_id.replace("/", "__") + ".json"


def write_pulled(folder: Path, data: dict[str, Any]) -> Path:
    """Check `data` as any data file is checked, then write it into `folder` (atomically)."""
    path = folder / file_name(data["model_id"])
    read_model_data(data, str(path))  # a catalogue entry batchrun cannot use is not written
    folder.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    part.replace(path)
    return path


def differences(local: dict[str, Any], pulled: dict[str, Any]) -> list[str]:
    """Where the API's entry (made into a data file) differs from the local file, both checked and
    normalised: input fields added, removed or changed, the required list, the output kind, the price."""
    found = []
    a, b = local["input_schema"], pulled["input_schema"]
    pa, pb = a.get("properties", {}), b.get("properties", {})
    for name in pb.keys() - pa.keys():
        found.append(f"field {name!r}: only in the API's schema")
    for name in pa.keys() - pb.keys():
        found.append(f"field {name!r}: only in the local file")
    for name in sorted(pa.keys() & pb.keys()):
        if pa[name] != pb[name]:
            found.append(f"field {name!r}: local {json.dumps(pa[name], sort_keys=True)}, "
                         f"API {json.dumps(pb[name], sort_keys=True)}")
    if sorted(a.get("required", [])) != sorted(b.get("required", [])):
        found.append(f"required: local {sorted(a.get('required', []))}, API {sorted(b.get('required', []))}")
    if local["output_kind"] != pulled["output_kind"]:
        found.append(f"output kind: local {local['output_kind']}, API {pulled['output_kind']}")
    lp, pp = local["price"], pulled["price"]
    if lp.unit != pp.unit:
        found.append(f"price unit: local {lp.unit}, API {pp.unit}")
    key = "usd_per_output" if pp.unit == "output" else "usd_per_second"
    if getattr(lp, key) != getattr(pp, key):
        shown = "unknown" if getattr(lp, key) is None else f"{getattr(lp, key):g}"
        found.append(f"price: local {shown}, API {getattr(pp, key):g} USD per {pp.unit}")
    return sorted(found)
