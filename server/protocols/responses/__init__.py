"""OpenAI's Responses API (`/v1/responses`), for Codex CLI, the Agents SDK and the newest openai clients:
`wire` (request and response models), `items` (input items -> turns; output items), `encoder` (the
response object and its event stream), `service` (stored responses, chains, background work),
`routes`."""
