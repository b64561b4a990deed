"""Backends: one ``Backend`` interface (``base``), the deterministic in-process ``mock``, and
``upstream`` for OpenAI-compatible HTTP servers (vLLM, llama.cpp server, Ollama), and
``llamacpp``, a llama.cpp server the node runs itself behind the same ``upstream`` code."""

from quorum.backends.base import Backend, BackendLoad, Fault, Generation

__all__ = ["Backend", "BackendLoad", "Fault", "Generation"]
