"""The base of every error whose message is meant for the user (bad input, bad params, a failed step)."""

__all__ = ["ExtractError", "SignflowError"]


class SignflowError(Exception):
    """Shown to the user as one message, without a traceback, by the command line."""


class ExtractError(SignflowError, RuntimeError):
    """The fetched source could not be verified or understood; the message says what to do."""
