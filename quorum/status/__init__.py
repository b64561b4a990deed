"""An operator's view of the cluster: the live status feed of a node
(``GET /cluster/events``, ``feed``), the page that draws it (``GET /``, ``routes`` and
``page.html``) and the same view in the terminal (``quorum status``, ``terminal``)."""

from quorum.status.feed import StatusFeed
from quorum.status.routes import add_status_routes, open_access

__all__ = ["StatusFeed", "add_status_routes", "open_access"]
