"""Anthropic's Messages API, for Claude Code and the Anthropic SDKs: `wire` (request and response
models), `messages` (the adapter: wire -> pipeline request, events -> message body or SSE events),
`routes` (`/v1/messages`, `/v1/messages/count_tokens`)."""
