"""The base of every error whose message is meant for the user (bad input, bad params, a failed step)."""


class SignflowError(Exception):
    """Shown to the user as one message, without a traceback, by the command line."""
