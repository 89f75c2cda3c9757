"""The database of stored OpenAI Responses (`/v1/responses` with `store: true`).

The Responses adapter keeps a response here so that a later request can fetch it
(`GET /v1/responses/{id}`), list its input items, delete it, or continue the conversation from it
(`previous_response_id`). This package owns only storage: what a row is (records.py), the interface
and the logic both backends share: image de-duplication and the retention/size limits (base.py),
the two backends (sqlite.py, the embedded default; postgres.py, for several replicas), and the
choice between them from the settings (factory.py).

It imports neither vLLM, FastAPI, nor anything under server/protocols or server/pipeline: the
adapter calls it with plain dicts, and the store never interprets a Response beyond its `status`
and `error` fields (set by `fail_abandoned`).
"""

from server.store.base import ResponseStore, StoreUsage
from server.store.factory import open_store
from server.store.records import ACTIVE_STATUSES, StoredResponse

__all__ = ["ACTIVE_STATUSES", "ResponseStore", "StoreUsage", "StoredResponse", "open_store"]
