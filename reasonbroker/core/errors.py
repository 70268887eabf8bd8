"""The exceptions of the core, one per kind of failure.

Outcomes (NO_CAPACITY, TIMEOUT, ...) are result codes carried as data; these
exceptions are for failures: the peer broke the protocol, we broke it, or the
configuration is unusable. Imports nothing (the packets import it); the SDK's
exceptions for failed jobs and lost brokers are in sdk/errors.py.
"""

from __future__ import annotations


class ReasonBrokerError(Exception):
    """Base class for every exception reasonbroker raises on purpose."""


class RemoteProtocolError(ReasonBrokerError):
    """The peer sent something the protocol forbids: close that connection, keep serving."""


class LocalProtocolError(ReasonBrokerError):
    """We were about to send something the protocol forbids: a bug in reasonbroker."""


class EncodeError(LocalProtocolError):
    """A value cannot be carried by the destination codec (e.g. bytes to a JSON peer)."""


class ConfigError(ReasonBrokerError):
    """The configuration is unusable; `key` names the offending setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message
