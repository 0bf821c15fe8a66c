"""The live dashboard and Prometheus metrics of a cluster: ``Cluster(dashboard="127.0.0.1:8787")``.

- ``guard.py``: the address it binds, and who may see it (Host, Origin, token).
- ``state.py``: the Instrument that folds scheduler events into bounded aggregates,
  and the loop-lag monitor.
- ``feed.py``: the JSON messages the page receives.
- ``metrics.py``: ``/metrics``, through prometheus-client.
- ``server.py``: the aiohttp server on the cluster's loop (loaded at start only: it
  imports aiohttp and prometheus-client, the ``dashboard`` extra).
- ``static/``: the page, its script and style (package data; nothing from elsewhere).
"""

from __future__ import annotations

import importlib.util

from .guard import DEFAULT_ADDRESS, Bind, parse_dashboard

__all__ = ["DEFAULT_ADDRESS", "Bind", "missing_requirements", "parse_dashboard"]


def missing_requirements(option: str) -> str | None:
    """Why a dashboard cannot be served here (a package missing), or None."""
    missing = [name for module, name in (("aiohttp", "aiohttp"), ("prometheus_client", "prometheus-client"))
               if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"{option} needs {' and '.join(missing)}, which are not installed: "
            "pip install 'aiodagger[dashboard]'")
