"""cdp-stream: a streaming Customer Data Platform.

The flow, stage by stage (each folder is one room):

    collector/   HTTP (Segment Tracking API) -> validate, enrich -> topic cdp.events
                 (invalid events -> cdp.events.rejected with their reason)
    bus/         the seam between stages: Kafka (aiokafka) or an in-process bus with the
                 same semantics (partitions by key, consumer groups, commit after work)
    resolver/    cdp.events -> identities, profiles and events in Postgres, one
                 transaction per micro-batch, offsets committed after the commit
    profiles/    the Postgres schema (Alembic), engine and the SQL for profiles
    activation/  cdp.profile-updates -> CRM records, audiences, anonymized DMP counts
    api/         the marketer API reading Postgres
    sdk/         the Python client that posts events to the collector
"""

__version__ = "0.1.0"
