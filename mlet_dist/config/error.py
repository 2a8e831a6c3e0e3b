"""The one error of the config package."""

from __future__ import annotations

from mlet_dist.errors import MletError


class ConfigError(MletError, ValueError):
    """A configuration file or override is invalid; the message names the key and the fix."""


def check_number(key: str, value: float, low: float, *, above: bool = False, why: str = "") -> None:
    """Refuses a value below ``low`` (at or below it with ``above``), NaN or infinite.

    Args:
        key: ``section.key``, named in the message.
        why: what the bound means, appended to the message (e.g. "0 = no limit").

    Raises:
        ConfigError: naming the key, the bound and the value.
    """
    finite = value == value and value not in (float("inf"), float("-inf"))
    if finite and (value > low if above else value >= low):
        return
    bound = f"> {low}" if above else f">= {low}"
    raise ConfigError(f"{key} must be {bound}{f' ({why})' if why else ''}, got {value!r}")
