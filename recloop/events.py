"""Event contracts of the four topics.

Every event is a frozen pydantic model, encoded as UTF-8 JSON and validated on both
sides: the producer refuses to send an invalid event, the consumer turns an invalid
record into a dead letter with the reason. Keys are the user id, so one user's events
stay ordered within a partition. Event time is milliseconds since the Unix epoch on the
clock of whoever produced the event (the simulator may run a virtual clock).
"""

from __future__ import annotations

import base64
import json
import math
import uuid
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

NonNegInt = Annotated[int, Field(ge=0)]
# Event times up to the end of year 9999 UTC: the lake stores them as timestamps, and a
# time beyond what a timestamp holds would stop every flush of the partition it is in.
MAX_EVENT_TIME_MS = 253_402_300_799_999
EventTimeMs = Annotated[int, Field(ge=0, le=MAX_EVENT_TIME_MS)]
Id = Annotated[str, Field(min_length=1, max_length=128)]
Probability = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


def new_event_id() -> str:
    return uuid.uuid4().hex


class EventError(ValueError):
    """A record that does not satisfy its topic's contract; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Event(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    topic: ClassVar[str]

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: Id = Field(default_factory=new_event_id)
    event_time_ms: EventTimeMs
    request_id: Id
    user_id: NonNegInt

    @property
    def key(self) -> bytes:
        return str(self.user_id).encode()

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class ServedItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    item_id: NonNegInt
    position: NonNegInt
    score: float = Field(allow_inf_nan=False)


class Impression(Event):
    """A session served to a user: which arm, which model version, which items."""

    topic: ClassVar[str] = "recloop.impressions"

    arm: Id
    model_version: Id
    items: Annotated[list[ServedItem], Field(min_length=1, max_length=256)]
    context: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _positions_are_a_ranking(self) -> Impression:
        positions = [it.position for it in self.items]
        if sorted(positions) != list(range(len(positions))):
            raise ValueError(f"item positions must be 0..{len(positions) - 1}, got {positions}")
        ids = [it.item_id for it in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError("an item appears twice in one session")
        return self


class Interaction(Event):
    """What a user did with one served item."""

    topic: ClassVar[str] = "recloop.interactions"

    item_id: NonNegInt
    position: NonNegInt
    arm: Id
    model_version: Id
    clicked: bool
    watch_time_s: float = Field(ge=0.0, le=24 * 3600.0, allow_inf_nan=False)
    liked: bool = False
    followed: bool = False
    context: dict[str, str] = Field(default_factory=dict)  # e.g. the simulation run

    @model_validator(mode="after")
    def _watch_needs_click(self) -> Interaction:
        if not self.clicked and (self.watch_time_s > 0 or self.liked or self.followed):
            raise ValueError("watch time, like and follow require clicked=true")
        return self


class Preference(Event):
    """A DPO pair mined from a mirrored request: chosen beats rejected."""

    topic: ClassVar[str] = "recloop.preferences"

    model_version: Id  # the version that generated both sessions (the DPO reference)
    history: Annotated[list[NonNegInt], Field(max_length=4096)]
    chosen: Annotated[list[NonNegInt], Field(min_length=1, max_length=256)]
    rejected: Annotated[list[NonNegInt], Field(min_length=1, max_length=256)]
    chosen_reward: float = Field(allow_inf_nan=False)
    rejected_reward: float = Field(allow_inf_nan=False)
    arm: Id | None = None  # the arm whose lineage generated the pair (its trainer uses it)
    reward_version: Id | None = None  # the reward model that ranked the candidates
    candidates: Annotated[int, Field(ge=2, le=1024)] | None = None  # sessions ranked

    @model_validator(mode="after")
    def _ordered(self) -> Preference:
        if self.chosen_reward < self.rejected_reward:
            raise ValueError("chosen_reward must be >= rejected_reward")
        return self


class DeadLetter(BaseModel):
    """A record that could not be processed, kept whole (raw bytes, base64) with why."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    topic: ClassVar[str] = "recloop.dlq"

    event_id: Id = Field(default_factory=new_event_id)
    event_time_ms: NonNegInt
    reason: Annotated[str, Field(min_length=1)]
    source_topic: str
    source_partition: int
    source_offset: int
    key_b64: str | None = None
    value_b64: str

    @field_validator("value_b64", "key_b64")
    @classmethod
    def _is_base64(cls, v: str | None) -> str | None:
        if v is not None:
            base64.b64decode(v, validate=True)
        return v

    @property
    def key(self) -> bytes:
        return self.source_topic.encode()

    @property
    def raw_value(self) -> bytes:
        return base64.b64decode(self.value_b64)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


EVENT_TYPES: dict[str, type[BaseModel]] = {
    cls.topic: cls for cls in (Impression, Interaction, Preference, DeadLetter)
}


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "(event)"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode(model: type[BaseModel], value: bytes | None) -> Any:
    """Parse and validate one record's value; raise EventError with the reason.

    A valid record is parsed once (pydantic's JSON mode: strict types, but JSON's own
    number/string forms are accepted). Only a record that fails is looked at again, to
    say why in plain words (not UTF-8, not JSON, not an object, or which field)."""
    if value is None:
        raise EventError("empty record (null value)")
    try:
        return model.model_validate_json(value)
    except ValidationError as exc:
        raise EventError(_reason(model, value, exc)) from exc


def _reason(model: type[BaseModel], value: bytes, exc: ValidationError) -> str:
    """Why ``value`` failed ``model`` (the slow path: invalid records only)."""
    try:
        data = json.loads(value)
    except UnicodeDecodeError as err:
        return f"not UTF-8: {err}"
    except json.JSONDecodeError as err:
        return f"not JSON: {err.msg} at char {err.pos}"
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    return f"invalid {model.__name__}: {_describe(exc)}"


# ---------------------------------------------------------------- the consumers' fast path
# The ingestor parses every impression and interaction it reads: with pydantic that was
# the biggest single cost of a drain (a fifth of its time, bench-ingest's profile). These
# msgspec structs are the same contracts, field for field, and parse ~5x faster; they
# only ever say yes. A record they refuse goes to the pydantic models above, which
# decide and give the reason, so the contract and its words stay in one place;
# tests/unit/test_events_fast.py checks that whatever the twins accept, the models accept
# with the same values.

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
_EventTime = Annotated[int, msgspec.Meta(ge=0, le=MAX_EVENT_TIME_MS)]


class _Struct(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """Frozen, no unknown fields (extra="forbid"); out of the cyclic collector's walks
    (a drain makes hundreds of thousands, none in a reference cycle)."""


class FastServedItem(_Struct, kw_only=True):
    item_id: _NonNeg
    position: _NonNeg
    score: float

    def __post_init__(self) -> None:
        if not math.isfinite(self.score):
            raise ValueError("score must be finite")


class _FastEvent(_Struct, kw_only=True):
    """:class:`Event`'s fields."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: _Id = msgspec.field(default_factory=new_event_id)
    event_time_ms: _EventTime
    request_id: _Id
    user_id: _NonNeg


class FastImpression(_FastEvent, kw_only=True):
    """:class:`Impression`'s twin."""

    arm: _Id
    model_version: _Id
    items: Annotated[list[FastServedItem], msgspec.Meta(min_length=1, max_length=256)]
    context: dict[str, str] = {}

    def __post_init__(self) -> None:
        n = len(self.items)
        if sorted(it.position for it in self.items) != list(range(n)):
            raise ValueError("item positions are not a ranking")
        if len({it.item_id for it in self.items}) != n:
            raise ValueError("an item appears twice in one session")


class FastInteraction(_FastEvent, kw_only=True):
    """:class:`Interaction`'s twin."""

    item_id: _NonNeg
    position: _NonNeg
    arm: _Id
    model_version: _Id
    clicked: bool
    watch_time_s: Annotated[float, msgspec.Meta(ge=0.0, le=24 * 3600.0)]
    liked: bool = False
    followed: bool = False
    context: dict[str, str] = {}

    def __post_init__(self) -> None:
        if not self.clicked and (self.watch_time_s > 0 or self.liked or self.followed):
            raise ValueError("watch time, like and follow require clicked=true")


FAST_TWINS: dict[type[BaseModel], type[msgspec.Struct]] = {
    Impression: FastImpression,
    Interaction: FastInteraction,
}
_FAST_DECODERS = {model: msgspec.json.Decoder(twin) for model, twin in FAST_TWINS.items()}


def decode_fast(model: type[BaseModel], value: bytes | None) -> Any:
    """:func:`decode` for the consumers' hot path: the model's msgspec twin when it has
    one (same fields, read the same way), else the model itself. Anything the twin
    refuses is decoded by :func:`decode`, so an invalid record fails with the model's
    reason and a valid one the twin cannot read (an integer beyond 64 bits, say) still
    passes."""
    fast = _FAST_DECODERS.get(model)
    if fast is not None and value is not None:
        try:
            return fast.decode(value)
        except msgspec.DecodeError:  # and its ValidationError: the model decides
            pass
    return decode(model, value)


def encode(event: BaseModel) -> bytes:
    """The JSON bytes of an event, checked against its own contract first (this also
    catches events built with ``model_construct``, which skips validation)."""
    data = event.model_dump_json().encode()
    decode(type(event), data)
    return data
