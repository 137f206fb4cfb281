"""Errors that are the user's to fix, kept apart from our own bugs.

The CLI turns a :class:`UserError` into one red line and exit code 2; anything else is a bug in
diffserve and keeps its traceback. The server maps the same class to a 4xx answer.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a wrong flag, a missing file, a schema violation. The message says what to fix."""

    exit_code = 2

