"""The project's error class: every error caused by what a user typed or pointed at.

``mlet-dist`` reports an :class:`MletError` (and its subclasses: configuration, data format,
checkpoint, serving, output path, run lock, disk full) as one line, ``mlet-dist: error: ...``,
with exit code 2 and no traceback (``--debug`` shows it). Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations


class MletError(Exception):
    """A user error: bad input, configuration, path or state; the message names it and the fix."""
