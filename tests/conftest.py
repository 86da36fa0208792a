"""The fixtures every layer shares live in tests/support/fixtures.py."""

pytest_plugins = ["tests.support.fixtures"]
