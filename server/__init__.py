"""taskstream: stream task progress from PostgreSQL to clients over Server-Sent Events."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
