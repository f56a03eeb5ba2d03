"""The Segment Tracking API events as pydantic models: the single source of their schemas.

The collector validates every incoming event with these models, and the JSON Schemas in
``schemas/`` are generated from them (``cdp-stream schemas``; a test fails when they drift).

Unknown keys are kept (``extra="allow"``): tracking libraries add their own (``_metadata``,
``library``...) and a CDP that silently drops data is worse than one that stores it. Ids
may be strings or integers (Segment's server libraries send both) and are stored as
strings. Timestamps must be ISO-8601 strings; one without a zone is read as UTC.

Server-owned fields (``receivedAt``, ``sourceId``, ``channel``, ``flags``) are set by the
collector on :class:`Event`, the enriched form published to ``cdp.events``; a client's
values for them are overwritten.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    WithJsonSchema,
    model_validator,
)

from cdp_stream.updates import ProfileUpdate

EventType = Literal["identify", "track", "page", "screen", "group", "alias"]
EVENT_TYPES: tuple[EventType, ...] = ("identify", "track", "page", "screen", "group", "alias")
Channel = Literal["website", "email", "purchase", "other"]

MAX_ID_CHARS = 255
MAX_MESSAGE_ID_CHARS = 100
MAX_SAFE_INTEGER = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER


def _require_str(value: object) -> object:
    """Timestamps are ISO-8601 strings; numbers (Unix times?) are refused, not guessed."""
    if not isinstance(value, str):
        raise ValueError("must be an ISO-8601 date-time string")
    return value


def _in_utc_range(value: datetime) -> datetime:
    """A time must exist in UTC too: ``0001-01-01T00:00:00+01:00`` is before year 1 there."""
    try:
        value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC (years 1-9999)") from None
    return value


def _id_str(value: object) -> str:
    """Ids are strings; integers (but not booleans) are accepted and stored as strings, when
    JSON keeps them exact (within ±(2^53-1)): a larger one has already been rounded by any
    JavaScript client, so its string would name someone else."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("must be a string or an integer")
    if isinstance(value, int) and abs(value) > MAX_SAFE_INTEGER:
        raise ValueError("an integer id must be within ±(2^53-1); send a larger one as a string")
    text = str(value)
    if len(text) > MAX_ID_CHARS:
        raise ValueError(f"must be at most {MAX_ID_CHARS} characters")
    return text


Id = Annotated[
    str,
    BeforeValidator(_id_str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": MAX_ID_CHARS},
                {"type": "integer", "minimum": -MAX_SAFE_INTEGER, "maximum": MAX_SAFE_INTEGER},
            ]
        }
    ),
]
UtcTime = Annotated[datetime, AfterValidator(_in_utc_range)]
Timestamp = Annotated[UtcTime, BeforeValidator(_require_str)]
Object = dict[str, Any]


class ExternalId(BaseModel):
    """A custom identifier, e.g. ``{"id": "C-42", "type": "crm_id"}``."""

    model_config = ConfigDict(extra="allow")

    id: Id
    type: Annotated[StrictStr, Field(min_length=1, max_length=64)]


class Context(BaseModel):
    """Extra information about the call; the known fields are typed, the rest kept."""

    model_config = ConfigDict(extra="allow")

    ip: StrictStr | None = None
    userAgent: StrictStr | None = None
    locale: StrictStr | None = None
    traits: Object | None = None
    page: Object | None = None
    campaign: Object | None = None
    device: Object | None = None
    library: Object | None = None
    externalIds: list[ExternalId] | None = None


_M = TypeVar("_M", bound=BaseModel)


def _identified(model: _M) -> _M:
    """Events without any id cannot land on a profile."""
    if getattr(model, "userId", None) is None and getattr(model, "anonymousId", None) is None:
        raise ValueError("an event needs a userId or an anonymousId")
    return model


class _Common(BaseModel):
    """The fields every call shares (Segment's "common fields")."""

    model_config = ConfigDict(extra="allow")

    userId: Id | None = None
    anonymousId: Id | None = None
    messageId: Annotated[StrictStr, Field(min_length=1, max_length=MAX_MESSAGE_ID_CHARS)] | None = (
        None
    )
    timestamp: Timestamp | None = None
    originalTimestamp: Timestamp | None = None
    sentAt: Timestamp | None = None
    context: Context | None = None
    integrations: Object | None = None
    writeKey: StrictStr | None = Field(
        default=None, description="the source's write key; never stored with the event"
    )

    @model_validator(mode="after")
    def _someone(self) -> Self:
        return _identified(self)


class Identify(_Common):
    """Who the user is, and their traits."""

    type: Literal["identify"] = "identify"
    traits: Object | None = None


class Track(_Common):
    """An action the user took."""

    type: Literal["track"] = "track"
    event: Annotated[StrictStr, Field(min_length=1, max_length=200)]
    properties: Object | None = None


class Page(_Common):
    """A website page view."""

    type: Literal["page"] = "page"
    name: StrictStr | None = None
    category: StrictStr | None = None
    properties: Object | None = None


class Screen(_Common):
    """A mobile app screen view."""

    type: Literal["screen"] = "screen"
    name: StrictStr | None = None
    category: StrictStr | None = None
    properties: Object | None = None


class Group(_Common):
    """The user belongs to a group (company, team, account)."""

    type: Literal["group"] = "group"
    groupId: Id
    traits: Object | None = None


class Alias(_Common):
    """Two user ids are the same person: the previous one is now ``userId``. The Segment
    spec and the web libraries name it ``previousId``; ``previousUserId`` is taken too."""

    type: Literal["alias"] = "alias"
    previousId: Id | None = None
    previousUserId: Id | None = None
    userId: Id

    @model_validator(mode="after")
    def _previous(self) -> Self:
        if self.previousId is None and self.previousUserId is None:
            raise ValueError("an alias needs previousId (or previousUserId)")
        return self


MODELS: dict[EventType, type[_Common]] = {
    "identify": Identify,
    "track": Track,
    "page": Page,
    "screen": Screen,
    "group": Group,
    "alias": Alias,
}


class Batch(BaseModel):
    """``POST /v1/batch``: many events; ``context``, ``integrations`` and ``sentAt`` given
    here apply to every event that does not set its own. Each item is validated on its own
    (a bad one is rejected, the others accepted)."""

    model_config = ConfigDict(extra="allow")

    batch: list[Any] = Field(description="the events, each as for its own endpoint")
    context: Object | None = None
    integrations: Object | None = None
    sentAt: Timestamp | None = None
    writeKey: StrictStr | None = None


class Event(BaseModel):
    """An accepted, enriched event: the value of each record on ``cdp.events``.

    ``timestamp`` is when it happened by the server's clock: the client's time corrected
    for clock skew (``receivedAt - (sentAt - originalTimestamp)``), or ``receivedAt`` when
    the client's time was more than a day ahead or before 2000 (then ``flags`` says
    ``timestamp_untrusted`` and ``originalTimestamp`` keeps what the client sent).
    """

    model_config = ConfigDict(extra="allow")

    type: EventType
    messageId: str
    sourceId: str
    userId: str | None = None
    anonymousId: str | None = None
    timestamp: UtcTime
    receivedAt: UtcTime
    sentAt: UtcTime | None = None
    originalTimestamp: str | None = None
    channel: Channel
    context: Object
    flags: list[Literal["timestamp_untrusted"]] | None = None

    @model_validator(mode="after")
    def _someone(self) -> Self:
        return _identified(self)


class Rejection(BaseModel):
    """A refused event and why: the value of each record on ``cdp.events.rejected``."""

    sourceId: str
    receivedAt: datetime
    endpoint: str
    index: int = Field(description="position in the batch (0 for a single call)")
    messageId: str | None = None
    reason: str
    event: Any = Field(description="the event exactly as received")


def json_schemas() -> dict[str, dict[str, Any]]:
    """file name -> JSON Schema, for ``schemas/``."""
    named: dict[str, type[BaseModel]] = {
        **{f"{name}.json": model for name, model in MODELS.items()},
        "batch.json": Batch,
        "event.json": Event,
        "rejection.json": Rejection,
        "profile-update.json": ProfileUpdate,
    }
    return {name: model.model_json_schema() for name, model in named.items()}
