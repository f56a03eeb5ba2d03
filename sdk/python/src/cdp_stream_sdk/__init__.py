"""The Python SDK: send Segment-spec events to a cdp-stream collector.

``Client`` batches on a background thread; ``AsyncClient`` does the same on an asyncio
task. Neither raises into the caller: problems are logged and counted in ``stats``.
"""

from cdp_stream_sdk.aio import AsyncClient
from cdp_stream_sdk.client import Client, Stats

__all__ = ["AsyncClient", "Client", "Stats"]
