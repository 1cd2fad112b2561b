"""The one download policy: when pretrained weights may be fetched, and why not.

Offline is declared by `LDM_OFFLINE` or `HF_HUB_OFFLINE` set to 1/true/yes/on (huggingface_hub's own switch,
so one variable silences every hub). A download that cannot work fails at once with the file to place,
instead of after a library's retries (huggingface_hub retries ~23 s per file, open_clip ~45 s).
"""
from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request

OFFLINE_VARIABLES = ("LDM_OFFLINE", "HF_HUB_OFFLINE")
TRUE_VALUES = frozenset({"1", "true", "yes", "on"})


def offline_reason() -> str | None:
    """Which variable declares the environment offline, or None when downloads are allowed."""
    for name in OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in TRUE_VALUES:
            return f"offline: {name} is set"
    return None


def downloads_allowed() -> bool:
    return offline_reason() is None


def download_blocker(url: str) -> str | None:
    """Why fetching `url` cannot work (offline, or without a proxy a host that does not resolve), else None."""
    reason = offline_reason()
    if reason is not None:
        return reason
    if urllib.request.getproxies():
        return None  # a proxy may reach hosts our resolver cannot
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"the host {host} does not resolve"
    return None
