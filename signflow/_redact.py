"""Credentials out of everything signflow shows or stores: a source URL may carry `user:password@`
or a token in its query string (`?token=`, `X-Amz-Signature=`, `sig=`, ...), and only data.dvc,
the user's own file, keeps it whole."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
HIDDEN = "***"
_SECRET_NAME = re.compile(r"token|key|sig|secret|passw|pwd|auth|credential|session|policy", re.IGNORECASE)
"""Query parameter names that carry credentials: `token`, `access_token`, `api_key`, `sig` (Azure SAS),
`X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `X-Goog-Signature`, `Policy`, ..."""


def url_credentials(url: str) -> list[str]:
    """What in `url` is a credential: its `user:password@`, and query parameters named like secrets."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else None
    # A password, or over http(s) a bare user name (tokens are sent that way); ssh://git@host is a login name.
    secret = userinfo is not None and (":" in userinfo or parts.scheme in ("http", "https"))
    found = ["a user name or password (user:password@)"] if secret else []
    names = [pair.split("=", 1)[0] for pair in re.split("[&;]", parts.query) if "=" in pair]
    found += [f"the query parameter {name!r}" for name in names if _SECRET_NAME.search(name)]
    return found


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return HIDDEN
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{HIDDEN}@{netloc.rsplit('@', 1)[1]}"
    # Every value, not a list of sensitive names: presigned and SAS URLs use many (`sig`, `se`,
    # `X-Goog-Signature`, `Policy`, ...), and host and path already say which dataset it is.
    query = re.sub(r"=[^&;]*", f"={HIDDEN}", parts.query)
    fragment = re.sub(r"=[^&;]*", f"={HIDDEN}", parts.fragment)
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_url(text: str) -> str:
    """`text` (a URL, or a message holding URLs) with each URL's user, password and query and
    fragment values replaced by `***`; paths and text without a URL are returned as they are."""
    return _URL.sub(_redact_match, str(text))


def _redact_match(match: re.Match) -> str:
    url = match.group(0).rstrip(".,:;)]}'")  # punctuation of the message around it
    return _redact_one(url) + match.group(0)[len(url) :]
