"""URLs that carry credentials are refused before any library sees them, and never printed.

A user name and password in a URL (``s3://user:SECRET@bucket/...``) or a signed / token query string
(``X-Amz-Signature``, ``sig=``, ``token=``) would be written into a store's provenance and printed in errors (by
embedcache, or by botocore when it fails). :func:`refuse_credentials` stops them first, naming the URL with the
secret replaced by ``***`` (:func:`redact`). Credentials belong in the environment (``AWS_*``), ``~/.aws`` or
the file system's own configuration.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["carries_secret", "redact", "refuse_credentials", "SECRET_HINT"]

_SECRET_QUERY = re.compile(r"(x-amz-(signature|credential|security-token)|signature=|sig=|token=|access_token=)", re.I)
SECRET_HINT = (
    "it would be written into the store and printed: give the credentials through the environment "
    "(AWS_ACCESS_KEY_ID, ...), ~/.aws or the file system's configuration, and a URL without them"
)


def carries_secret(url: str) -> bool:
    """True for URLs with user info (``https://user:pass@host``) or a signed / token query string."""
    if "://" not in str(url):
        return False
    parts = urlsplit(str(url))
    return "@" in parts.netloc or bool(_SECRET_QUERY.search(parts.query))


def redact(url: str) -> str:
    """``url`` with its user info and query string replaced by ``***``."""
    text = str(url)
    if "://" not in text:
        return text
    parts = urlsplit(text)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))


def refuse_credentials(url: str, what: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` naming ``what`` and the redacted ``url`` when it carries credentials."""
    if carries_secret(url):
        raise error(f"{what} {redact(url)} carries credentials (user:password@ or a signed/token query); {SECRET_HINT}")
