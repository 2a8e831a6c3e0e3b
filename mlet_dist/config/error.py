"""The one error of the config package."""

from __future__ import annotations

from mlet_dist.errors import MletError


class ConfigError(MletError, ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""
