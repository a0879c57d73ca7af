"""A local Hub that speaks the HTTP API huggingface_hub uses, for tests and the demo."""

from mergebot.dev.devhub.server import DevHub, serve

__all__ = ["DevHub", "serve"]
