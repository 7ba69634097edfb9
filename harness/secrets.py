"""Keeping secrets off screens, logs and files: the one place that knows what a secret looks like.

A secret is the password of a URL with userinfo (``postgresql://u:secret@host/db``,
``http://u:secret@mlflow:5000``) or a ``password=`` / ``token=`` query parameter. :func:`redact`
hides them in any text (a URL, an error message, a traceback), keeping the user name and the rest,
so a redacted URL still says which server and database were tried.
"""
from __future__ import annotations

import re

__all__ = ["redact"]

# scheme://user:password@host -- the password runs to the last "@" before the host (an unescaped "@" in a
# password is common in hand-written URLs), never past whitespace, a quote or a "/".
_USERINFO = re.compile(r"//([^:/@\s'\"]+):[^/\s'\"]*@")
_QUERY = re.compile(r"([?&](?:password|passwd|pwd|pass|token|secret)=)[^&\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide URL passwords in ``text``: ``postgresql://u:secret@host/db`` -> ``postgresql://u:***@host/db``,
    ``...?password=secret`` -> ``...?password=***``."""
    return _QUERY.sub(r"\1***", _USERINFO.sub(r"//\1:***@", str(text)))
