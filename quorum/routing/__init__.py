"""Routing: the membership view, choosing candidates for a request, and dispatch/relay."""
