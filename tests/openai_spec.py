"""Validation against OpenAI's published spec now lives in ``tests/helpers.py``; this name
stays for tests/test_wire.py and tests/test_mock_backend.py until they import it from there."""

from tests.helpers import SPEC_PATH, validate, validator

__all__ = ["SPEC_PATH", "validate", "validator"]
