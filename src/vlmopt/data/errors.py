"""The error a failed download raises, shared by downloads and the archive checks they make."""

from __future__ import annotations

__all__ = ["DownloadError"]


class DownloadError(OSError):
    """A download that failed: after every retry (the partial file stays for the next attempt), or
    for good (an HTTP client error, an HTML page instead of the file)."""
