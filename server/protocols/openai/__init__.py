"""OpenAI's wire protocol: chat completions, text completions, the tokenizer routes and models.

`wire` holds the request and response models, `validation` turns pydantic's errors and unknown
fields into OpenAI's 400; `chat`, `completions` and `tokenize` are the adapters (wire request ->
`server.pipeline.request`, pipeline events -> JSON or SSE); `routes` puts them on the app.
"""
