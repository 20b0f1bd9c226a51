"""The errors of the config: :class:`ConfigError` for users, :class:`FieldError` from ``validate()``."""

from __future__ import annotations

__all__ = ["ConfigError", "ConfigFileNotFoundError", "FieldError"]


class ConfigError(ValueError):
    """A configuration file, override or value is invalid; the message names the source and dotted key."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """The requested config file does not exist (both a :class:`ConfigError` and a ``FileNotFoundError``)."""


class FieldError(ValueError):
    """A value a section's ``validate()`` refuses, with the key it belongs to.

    ``field`` is the key relative to the section (``"lr"``, ``"augment[0]"``, ``"head.box_nms_thresh"``)
    and ``problem`` the rest of the sentence (``"must be > 0; got 0.0"``). The loader joins ``field`` to
    the section's dotted path and names the file that set it; any exception with these two attributes
    is reported the same way.
    """

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field = field
        self.problem = problem

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.field, self.problem)
