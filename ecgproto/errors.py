"""The exception types a user can fix, imported anywhere in the library. How the command line reports them
(one line, exit 2) is ecgproto.cli_messages."""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix, stated as `<what>: <why> - <what to do>`."""


class ConfigError(UserError):
    """A configuration file or value is not valid."""
