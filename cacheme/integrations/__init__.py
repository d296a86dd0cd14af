"""Helpers that fit cacheme into frameworks; each module imports nothing of its framework.

- ``cacheme.integrations.fastapi``: ``cacheme_lifespan``, a lifespan for FastAPI and
  Starlette that registers storages at start-up and closes them at shutdown.
"""
