"""prmserve on Ray (`pip install "prmserve[ray]"`): `PRMActor` (a PRM in an actor, for RL loops), `RoutedPRM`
(PRM's API over N replicas with prefix affinity; `prmserve serve --data-parallel-size N` serves it) and
`PRMDeployment` (a Ray Serve deployment of the same, for a user's own Serve app)."""

from prmserve.ray.actor import PRMActor
from prmserve.ray.routed import RoutedPRM

__all__ = ["PRMActor", "RoutedPRM", "PRMDeployment", "build_app"]


def __getattr__(name: str):
    """Ray Serve is imported only when its deployment is asked for."""
    if name in ("PRMDeployment", "build_app"):
        from prmserve.ray import deployment

        return getattr(deployment, name)
    raise AttributeError(f"module 'prmserve.ray' has no attribute {name!r}")
