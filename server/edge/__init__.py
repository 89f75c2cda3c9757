"""What every HTTP request passes before it reaches a route: size limits, API keys, CORS, request metrics.

Pure ASGI middleware, the same for every protocol; refusals are built by `server/errors.py`.
"""
