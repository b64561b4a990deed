"""The gateway: who is calling (API keys, roles, model allowlists) and how much they may use
(quotas counted per node and summed over the cluster through gossip).

``quorum.gateway.keys``: the ``[auth]`` keys and the check of ``Authorization: Bearer``.
``quorum.gateway.quota``: per-key windows, the cluster's sum, and the quota headers.
``quorum.gateway.policy``: governance rules (``[[policies]]``) on request text and on the
streamed answer; ``quorum.gateway.regex_bounds``, what a rule's regex can read.
"""
