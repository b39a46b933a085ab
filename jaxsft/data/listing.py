"""Where-lists of the data report: how many examples a finding has, and the first of them."""

from __future__ import annotations

MAX_LISTED = 20  # example locations listed per finding


def listed(wheres) -> dict:
    """{"count": n, "examples": the first MAX_LISTED locations}."""
    wheres = list(wheres)
    return {"count": len(wheres), "examples": wheres[:MAX_LISTED]}
