"""Method name -> adapter layer class. Each method module registers itself on import."""

from __future__ import annotations

METHODS: dict[str, type] = {}


def register(cls):
    METHODS[cls.method] = cls
    return cls
