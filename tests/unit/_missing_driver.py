"""A fake backend module whose driver is not installed (see test_storages.py)."""

import some_missing_driver_xyz  # noqa: F401

FakeStorage = None
