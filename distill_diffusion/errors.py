"""The one error type users see: a mistake in their input, reported as one line with what to do, exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (config, paths, data). The CLIs print ``error: <message>`` and exit with code 2."""
