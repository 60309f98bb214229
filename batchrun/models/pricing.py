"""A model's price as a formula: USD per second of output or per output, read from the job's own fields.

The shapes it covers (facts: shared/reference/models/README.md, "Pricing works in different ways"):
- per second: the duration field whatever its shape (integer, integer enum, numeric text such as "10";
  ``duration_unit: "ms"`` for milliseconds); a value it cannot turn into seconds ("auto") is unknown;
- per output: ``usd_per_output`` for each output a job returns (image models);
- the audio switch whatever its name (``audio_field``) or sense (``audio_inverted`` for a switch such as
  ``force_instrumental``, where true means no audio);
- ``multipliers``: ``{field: {value: factor}}``, a value written as JSON text (``"true"``, ``"2K"``, ``"10"``).
Any rate that is null is unknown, and so is every estimate that needs it: `estimate` returns None then.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

UNITS = ("second", "output")


@dataclass(frozen=True)
class Price:
    """USD rates and the fields they are read from; a rate of None is unknown (no public source gives it)."""

    usd_per_second: float | None = None
    usd_per_second_with_audio: float | None = None
    duration_field: str | None = "duration"
    audio_field: str | None = "generate_audio"
    unit: str = "second"  # "second" (of video or audio) or "output" (each image)
    usd_per_output: float | None = None
    duration_unit: str = "s"  # "s" or "ms"
    audio_inverted: bool = False
    multipliers: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        """True when at least the base rate of its unit is known."""
        return (self.usd_per_output if self.unit == "output" else self.usd_per_second) is not None

    def describe(self) -> str:
        """One line for people: ``0.084 USD/s (0.126 with audio via generate_audio)`` or ``unknown per output``."""
        if self.unit == "output":
            text = "unknown per output" if self.usd_per_output is None else f"{self.usd_per_output:g} USD/output"
        else:
            text = "unknown per second" if self.usd_per_second is None else f"{self.usd_per_second:g} USD/s"
            with_audio = self.usd_per_second_with_audio
            if self.audio_field and with_audio is not None and with_audio != self.usd_per_second:
                sense = " (inverted)" if self.audio_inverted else ""
                text += f" ({with_audio:g} with audio via {self.audio_field}{sense})"
        for name, table in self.multipliers.items():
            text += f"; x by {name}: " + ", ".join(f"{k}={v:g}" for k, v in table.items())
        return text


def value_key(value: Any) -> str:
    """How a field value is written as a key of `multipliers`: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def seconds_of(value: Any, duration_unit: str = "s") -> float | None:
    """Seconds in a duration field's value (int, float or numeric text; ms when `duration_unit` is "ms"),
    or None when it holds no number ("auto", missing)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if not isinstance(value, (int, float)):
        return None
    return float(value) / 1000.0 if duration_unit == "ms" else float(value)


def estimate(price: Price, job_input: dict[str, Any], defaults: dict[str, Any], outputs: int = 1) -> float | None:
    """USD for one job with `job_input` (missing fields take `defaults`), or None when unknown.

    `outputs` is how many outputs a per-output price is paid for.
    """
    def read(name: str | None) -> Any:
        return None if name is None else job_input.get(name, defaults.get(name))

    if price.unit == "output":
        rate, amount = price.usd_per_output, float(outputs)
    else:
        audio = read(price.audio_field)
        audio_on = price.audio_field is not None and bool(audio) != price.audio_inverted
        rate = price.usd_per_second
        if audio_on and price.usd_per_second_with_audio is not None:
            rate = price.usd_per_second_with_audio
        if price.duration_field is None:
            return None
        amount = seconds_of(read(price.duration_field), price.duration_unit)
        if amount is None:
            return None
    if rate is None:
        return None
    for name, table in price.multipliers.items():
        rate *= table.get(value_key(read(name)), 1.0)
    return round(amount * rate, 4)
