"""Gemma 3 OpenAI-compatible server."""
