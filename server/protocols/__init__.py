"""The wire protocols the server speaks; each is a thin adapter over the one pipeline.

Where a new protocol goes: a package here with
- `wire.py`: its request models (pydantic, every field bounded) and response models (for OpenAPI);
- an adapter per endpoint: a function from the validated wire request to a
  `server.pipeline.request.GenerationRequest`, and an encoder (`server.pipeline.pipeline.ResponseEncoder`)
  that writes the pipeline's events as the protocol's JSON body or SSE stream;
- `routes.py`: an APIRouter the app includes (`server/app.py`);
- its error shape in `server/errors.py` (`format_for_path`), so errors raised anywhere, the edge's
  included, come out in its shape.
Admission, Gemma 3 normalization, images, prompt building, generation, disconnects and the stream's
error tail are the pipeline's: a protocol never re-implements them. `validation.py` is shared:
pydantic's errors as one 400, and the unknown-field policy.
"""
