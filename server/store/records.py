"""The plain types of the store: one stored response, as the Responses adapter hands it over.

Plain dataclasses and JSON-serializable dicts only: no database, no wire model, so the adapter and
both backends agree on one shape without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A background response in one of these states is still being worked on by some process, which holds
# a lease on it; if that process died, its lease lapses and `ResponseStore.fail_abandoned` is what
# tells the client so.
ACTIVE_STATUSES = ("queued", "in_progress")


@dataclass
class StoredResponse:
    id: str
    """"resp_..."."""
    owner: str
    """Who may see it: a digest of the caller's API key, or "anonymous" when auth is off."""
    created_at: float
    """Unix seconds. Retention and the size cap's eviction order both go by it."""
    status: str
    """"queued" | "in_progress" | "completed" | "incomplete" | "failed" | "cancelled"."""
    response: dict[str, Any]
    """The full Response object as the API returns it (JSON-serializable)."""
    input_items: list[dict[str, Any]]
    """This request's input items, each with an "id", in the order /input_items lists them ("asc")."""
    history: list[dict[str, Any]]
    """The whole conversation as items (earlier turns + this input + this output): what a request
    with `previous_response_id` continues from."""
    background: bool = False
