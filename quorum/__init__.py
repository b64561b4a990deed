"""Quorum: several machines running LLM backends served as one OpenAI-compatible cluster.

Every node serves the OpenAI API; the node a request reaches picks the best backend in the
cluster, forwards the request if it lives elsewhere, and relays the serving node's bytes.
See ``DESIGN.md`` for the parts and the direction of their imports.
"""

__version__ = "0.1.0"
