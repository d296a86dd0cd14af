"""cacheme: asyncio, node-based caching (public API is filled in by cacheme.api)."""
