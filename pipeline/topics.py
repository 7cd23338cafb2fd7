"""Every Kafka topic the pipeline uses, in one place.

Topics are always created explicitly with these partition counts (never by
broker auto-creation): all event topics share one partition count so that
Faust co-partitions them with the state tables (a dealer's visits, surveys
and buckets live on the same partition number, hence the same worker).
"""

from __future__ import annotations

from dataclasses import dataclass

EVENT_PARTITIONS = 4
"""Partitions of every event topic and of the state changelogs."""


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    purpose: str


# One topic per event type, key = dealer_id, JSON values (DOMAIN.md).
EVENT_TOPICS: dict[str, TopicSpec] = {
    event_type: TopicSpec(f"csi.events.{event_type}", EVENT_PARTITIONS, f"{event_type} events")
    for event_type in ("visit", "survey", "call", "mystery_shop", "complaint")
}

DEAD_LETTERS = TopicSpec(
    "csi.dead_letters", EVENT_PARTITIONS, "rejected input: original bytes, reason, source topic"
)
METRICS = TopicSpec(
    "csi.metrics", EVENT_PARTITIONS, "metric snapshots per dealer, day and rolling window"
)

ROLLUPS = TopicSpec(
    "csi.rollups",
    EVENT_PARTITIONS,
    "dealer-day buckets (absolute values) keyed by region, brand or network, for roll-ups",
)

# Case actions are keyed by dealer_id and partitioned like the event topics:
# a dealer's cases live in its partition's state.
CASE_ACTIONS = TopicSpec(
    "csi.case_actions", EVENT_PARTITIONS, "case actions: contact, resolve, close, reopen"
)
ALERTS = TopicSpec(
    "csi.alerts", EVENT_PARTITIONS, "alerts and case changes (JSON, with a delivery_id)"
)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    *EVENT_TOPICS.values(), DEAD_LETTERS, METRICS, ROLLUPS, CASE_ACTIONS, ALERTS,
)  # fmt: skip


def topic_for(event_type: str) -> str:
    """Topic name for an event type; ValueError for a type with no topic."""
    try:
        return EVENT_TOPICS[event_type].name
    except KeyError:
        known = sorted(EVENT_TOPICS)
        raise ValueError(f"unknown event_type {event_type!r}; known: {known}") from None
