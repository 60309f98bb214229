"""Write batchrun/models/*.json from the catalogue facts in shared/reference/models/ (run by hand).

    python tools/gen_models.py ../shared/reference/models

Skips files with ``schema_retrieved: false`` (no schema known) and the Kling 3.0 Standard image-to-video
file, whose shipped data file is hand-kept (it adds the structured fields the catalogue leaves out).
The schema is written as the catalogue gives it (RunComfy's media formats included); batchrun normalises
it on load. Prices stay null where no public source gives one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HAND_KEPT = {"kling/kling-3.0/standard/image-to-video"}
AUDIO_SWITCHES = ("generate_audio", "sound", "enable_audio", "force_instrumental")
KLING_EXTENSIONS = ["jpg", "jpeg", "png", "bmp", "webp"]
EXPECTED_SECONDS = {"video": 90, "image": 20, "audio": 30}
# Facts given only in field text or prose (reference README, "Pricing" and "A reference can be...").
MULTIPLIERS = {
    "kling/kling-video-o3/pro/image-to-video": {"sound": {"true": 1.25}},
    "bytedance/seedream-5.0-pro/image-to-image": {"resolution": {"1K": 1.0, "2K": 2.0}},
}
RULES = {
    "kling/kling-video-o3/standard/reference-to-video": {
        "max_items_when": [{"field": "images", "max": 4, "when_present": "video"}]},
    "bytedance/seed-audio-1.0/text-to-audio": {"mutually_exclusive": [["image_url", "audio_urls"]]},
}
# Kling 3.0's pixel rules (each side >= 300 px, aspect within 1:2.5..2.5:1), as relayed by its API pages.
KLING_IMAGE_LIMITS = {"image_limits": {"min_side": 300, "max_aspect": 2.5, "who": "Kling"}}
SAMPLE = {"image": "https://example.com/input.png", "video": "https://example.com/input.mp4",
          "audio": "https://example.com/input.wav"}


def _example(props: dict, required: list[str]) -> dict:
    """A small valid input: every required field, media fields as https URLs."""
    example = {}
    for name in required:
        spec = props[name]
        fmt = spec.get("format") or spec.get("items", {}).get("format") or ""
        if fmt.endswith("_uris"):
            example[name] = [SAMPLE[fmt.split("_")[0]]] * max(1, spec.get("minItems", 1))
        elif fmt.endswith("_uri"):
            example[name] = SAMPLE[fmt.split("_")[0]]
        elif name == "prompt":
            example[name] = "a red fox crosses a snowy field at dawn"
        else:
            example[name] = spec["default"]
    return example


def convert(ref: dict) -> dict:
    model_id, props = ref["model_id"], ref["input"]["properties"]
    required = ref["input"].get("required", [])
    kind = ref["output_kind"]
    price_ref = ref["price"]
    price: dict = {"unit": price_ref.get("unit") or "second"}
    if price["unit"] == "output":
        price["usd_per_output"] = price_ref.get("usd")
        price["duration_field"] = price["audio_field"] = None
    else:
        price["usd_per_second"] = price_ref.get("usd")
        price["usd_per_second_with_audio"] = price_ref.get("with_audio_usd")
        if "music_length_ms" in props:
            price["duration_field"], price["duration_unit"] = "music_length_ms", "ms"
        else:
            price["duration_field"] = "duration" if "duration" in props else None
        price["audio_field"] = next((a for a in AUDIO_SWITCHES if a in props), None)
        if price["audio_field"] == "force_instrumental":
            price["audio_inverted"] = True
    if model_id in MULTIPLIERS:
        price["multipliers"] = MULTIPLIERS[model_id]
    price["notes_facts"] = price_ref.get("notes_facts", "")
    out = {
        "model_id": model_id,
        "title": " ".join(part for part in model_id.split("/")[1:]),
        "source": ref["source"],
        "page_url": ref.get("page_url"),
        "output_kind": kind,
        "max_outputs": 1,
        "expected_seconds": EXPECTED_SECONDS[kind],
        "price": price,
        "image_extensions": KLING_EXTENSIONS if model_id.startswith("kling/") else [],
        "rules": {**RULES.get(model_id, {}), **(KLING_IMAGE_LIMITS if model_id.startswith("kling/kling-3.0/")
                                                 and "start_image_url" in props else {})},
        "prose_rules": ref.get("prose_rules", []),
        "example_input": _example(props, required),
        "input_schema": {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                         "required": required, "additionalProperties": False, "properties": props},
    }
    return out


def main(argv: list[str]) -> int:
    source = Path(argv[1] if len(argv) > 1 else "../shared/reference/models")
    dest = Path(__file__).resolve().parent.parent / "batchrun" / "models"
    for path in sorted(source.glob("*.json")):
        ref = json.loads(path.read_text(encoding="utf-8"))
        if ref.get("schema_retrieved") is False or ref["model_id"] in HAND_KEPT:
            print(f"skipped {ref['model_id']}")
            continue
        name = ref["model_id"].replace("/", "__").lower() + ".json"
        (dest / name).write_text(json.dumps(convert(ref), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote batchrun/models/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
