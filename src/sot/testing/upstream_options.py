"""Options of the test upstream (`sot.testing.upstream`): server-wide defaults, fault names, per-request overrides."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from sot.testing.replay import ReplayBook

DEFAULT_MODEL = "sot-test-model"
# HTTP statuses from 400 to 599 are faults too ("429", "503", ...).
FAULTS = (
    "429",
    "500",
    "401",
    "stall",
    "stall-mid",
    "cut",
    "error-mid-stream",
    "malformed-json",
    "malformed-shape",
    "empty",
    "no-finish",
    "slow-headers",
)
# Faults whose answer stops after `fault_after` tokens.
TRUNCATING_FAULTS = frozenset({"stall-mid", "cut", "error-mid-stream", "malformed-json", "malformed-shape"})
KINDS = ("skeleton", "point", "full")
Kind = Literal["skeleton", "point", "full"]
# Request headers /stats always records (lower case), when a request carries them.
RECORDED_HEADERS = ("x-sot-session", "x-request-id")


@dataclass(frozen=True, slots=True)
class UpstreamOptions:
    """Server-wide behaviour. All but `model`, `fault_first`, `fault_kind`, `seed`, `record_headers` and `replay`
    can be overridden per request."""

    model: str = DEFAULT_MODEL
    skeleton_points: int = 5
    tokens_per_answer: int = 60
    full_answer_factor: float = 3.0
    # Prose answers are this fraction longer or shorter at most (0.2: from 0.8x to 1.2x), deterministically
    # from `seed` and the messages. 0: every answer of a kind has the same length.
    tokens_jitter: float = 0.0
    ttft: float = 0.05
    # <= 0 or inf means "no delay between tokens".
    tokens_per_second: float = 50.0
    fault: str | None = None
    fault_rate: float = 1.0
    # When > 0, exactly the first K requests get `fault` and `fault_rate` is ignored.
    fault_first: int = 0
    # Only requests of this kind ("skeleton", "point", "full") can get the fault; None: any request.
    fault_kind: str | None = None
    fault_after: int = 3
    # Seconds, sent as the Retry-After header of a 429; fractions are allowed ("0.5").
    retry_after: float = 1.0
    # Seeds the --fault-rate dice and the --tokens-jitter lengths.
    seed: int = 0
    # Request headers recorded in /stats besides RECORDED_HEADERS (lower case).
    record_headers: tuple[str, ...] = ()
    # Answer lengths replayed from a `sot eval run` results file, per question (`sot.testing.replay`).
    replay: ReplayBook | None = None


class BadRequest(Exception):
    """A malformed request; answered with HTTP 400 and an OpenAI error object."""


def normalize_fault(value: object) -> str | None:
    """A fault name as used internally (None for no fault); raises ValueError for an unknown one."""
    if value is None:
        return None
    name = str(value).strip().lower()
    if name in ("", "none", "off"):
        return None
    if name in FAULTS or (name.isdigit() and 400 <= int(name) <= 599):
        return name
    raise ValueError(f"unknown fault {value!r}; expected one of {', '.join(FAULTS)}, none, or an HTTP status")


def format_seconds(seconds: float) -> str:
    """A Retry-After value: "1" for 1.0, "0.5" for 0.5 (at most millisecond precision, never an exponent)."""
    if float(seconds).is_integer():
        return str(int(seconds))
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


# ---------------------------------------------------------------------------------------------------------
# Per-request overrides
# ---------------------------------------------------------------------------------------------------------

_OVERRIDABLE: dict[str, type] = {
    "skeleton_points": int,
    "tokens_per_answer": int,
    "full_answer_factor": float,
    "tokens_jitter": float,
    "ttft": float,
    "tokens_per_second": float,
    "fault": str,
    "fault_rate": float,
    "fault_after": int,
    "retry_after": float,
}
_ALIASES = {"points": "skeleton_points"}
# Fractions: at most 1.
_FRACTIONS = ("fault_rate", "tokens_jitter")


@dataclass(frozen=True, slots=True)
class Overrides:
    """What one request asked to change."""

    options: dict[str, Any] = field(default_factory=dict)
    tokens: int | None = None
    kind: Kind | None = None


def _coerce(key: str, kind: type, value: object) -> Any:
    # bool is an int subclass; {"tokens": true} is a mistake, not 1.
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise BadRequest(f"sot_test.{key} must be >= 0")
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0 or math.isnan(value):
            raise BadRequest(f"sot_test.{key} must be >= 0")
        return float(value)
    if kind is str and (value is None or isinstance(value, str | int)):
        return value
    raise BadRequest(f"sot_test.{key} has the wrong type ({type(value).__name__})")


def _merge_sources(body_field: object, header_fault: str | None, header_options: str | None) -> dict[str, object]:
    merged: dict[str, object] = {}
    if header_fault is not None:
        merged["fault"] = header_fault
    if header_options:
        try:
            parsed = json.loads(header_options)
        except ValueError as exc:
            raise BadRequest("X-Test-Options is not valid JSON") from exc
        if not isinstance(parsed, dict):
            raise BadRequest("X-Test-Options must be a JSON object")
        merged.update(parsed)
    if body_field is not None:
        if not isinstance(body_field, dict):
            raise BadRequest("sot_test must be an object")
        merged.update(body_field)
    return merged


def parse_overrides(body_field: object, header_fault: str | None, header_options: str | None) -> Overrides:
    """The overrides of one request: the body's `sot_test` object over the X-Test-Options and X-Test-Fault
    headers. Raises BadRequest for an unknown key or a bad value."""
    options: dict[str, Any] = {}
    tokens: int | None = None
    kind: Kind | None = None
    for raw_key, value in _merge_sources(body_field, header_fault, header_options).items():
        key = str(raw_key).replace("-", "_")
        key = _ALIASES.get(key, key)
        if key == "tokens":
            tokens = _coerce(key, int, value)
        elif key == "kind":
            if value not in KINDS:
                raise BadRequest(f"sot_test.kind must be one of {', '.join(KINDS)}")
            kind = value  # type: ignore[assignment]
        elif key in _OVERRIDABLE:
            options[key] = _coerce(key, _OVERRIDABLE[key], value)
        else:
            raise BadRequest(f"unknown sot_test field {raw_key!r}")
    if "fault" in options:
        try:
            # Keep the key even for "none": an explicit "no fault" beats the server-wide one.
            options["fault"] = normalize_fault(options["fault"])
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
    for key in _FRACTIONS:
        if key in options and options[key] > 1:
            raise BadRequest(f"sot_test.{key} must be between 0 and 1")
    return Overrides(options=options, tokens=tokens, kind=kind)
