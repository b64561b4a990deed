"""Backends: one ``Backend`` interface (``base``); the deterministic in-process ``mock``;
``upstream`` for OpenAI-compatible HTTP servers (vLLM, llama.cpp server, Ollama); ``llamacpp``,
a llama.cpp server the node runs itself behind the same ``upstream`` code; and ``headers``,
which headers pass between clients and upstream servers."""

from quorum.backends.base import Backend, BackendLoad, Fault, Generation
from quorum.backends.headers import HeaderPolicy

__all__ = ["Backend", "BackendLoad", "Fault", "Generation", "HeaderPolicy"]
