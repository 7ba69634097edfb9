"""Keeping secrets off screens, logs and files: the one place that knows what a secret looks like."""
from __future__ import annotations

import re

__all__ = ["redact"]

_USERINFO = re.compile(r"//([^:/@]+):[^@]*@")


def redact(url: str) -> str:
    """Hide the password of a URL with userinfo: ``postgresql://u:secret@host/db`` -> ``postgresql://u:***@host/db``."""
    return _USERINFO.sub(r"//\1:***@", url)
