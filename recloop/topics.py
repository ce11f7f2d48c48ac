"""The topics of the loop, declared once.

Every topic recloop uses is listed here with its partition count and retention; ``recloop
up`` and the integration tests create topics from this list only.
"""

from __future__ import annotations

from dataclasses import dataclass

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int
    description: str = ""

    def new_topic(self, replication_factor: int = 1) -> NewTopic:
        return NewTopic(
            name=self.name,
            num_partitions=self.partitions,
            replication_factor=replication_factor,
            topic_configs={"retention.ms": str(self.retention_ms)},
        )


IMPRESSIONS = TopicSpec(
    "recloop.impressions", 3, 7 * DAY_MS, "sessions served: arm, model version, items"
)
INTERACTIONS = TopicSpec("recloop.interactions", 3, 7 * DAY_MS, "user feedback on served items")
PREFERENCES = TopicSpec(
    "recloop.preferences", 1, 30 * DAY_MS, "DPO pairs mined from mirrored traffic"
)
DLQ = TopicSpec("recloop.dlq", 1, 30 * DAY_MS, "malformed records with the reason")

TOPICS: tuple[TopicSpec, ...] = (IMPRESSIONS, INTERACTIONS, PREFERENCES, DLQ)


def ensure_topics(
    bootstrap_servers: str, specs: tuple[TopicSpec, ...] | list[TopicSpec] = TOPICS
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, client_id="recloop-admin")
    try:
        existing = set(admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        if missing:
            try:
                admin.create_topics([s.new_topic() for s in missing])
            except TopicAlreadyExistsError:
                pass  # another process created them between list and create
        return [s.name for s in missing]
    finally:
        admin.close()
