"""Event schemas: strict models of the pipeline's input events and `parse_event`."""

from schemas.events import (
    EVENT_TYPES,
    SUPPORTED_EVENT_TYPES,
    AnyEvent,
    AuditItem,
    CallEvent,
    ComplaintEvent,
    Envelope,
    Event,
    InvalidEvent,
    MysteryShopEvent,
    Scale,
    SurveyEvent,
    VisitEvent,
    event_to_json,
    parse_event,
)

__all__ = [
    "EVENT_TYPES",
    "SUPPORTED_EVENT_TYPES",
    "AnyEvent",
    "AuditItem",
    "CallEvent",
    "ComplaintEvent",
    "Envelope",
    "Event",
    "InvalidEvent",
    "MysteryShopEvent",
    "Scale",
    "SurveyEvent",
    "VisitEvent",
    "event_to_json",
    "parse_event",
]
