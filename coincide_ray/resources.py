"""What the Ray cluster has, what its autoscaler could add, and waiting for what a stage asks.

A stage plans from what it asks for, never only from what happens to be up at the first
second: on an autoscaling cluster GPU nodes start from zero and join minutes later.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import ray

WAIT_MESSAGE_EVERY_S = 10.0
POLL_S = 0.5


class ResourcesUnavailable(RuntimeError):
    """The cluster did not offer what the run asked for within its wait."""


def present() -> dict[str, float]:
    """Resources of the nodes alive now."""
    return dict(ray.cluster_resources())


def reachable() -> dict[str, float]:
    """The most of each resource the cluster could have: what is up now, or what its
    autoscaler's node types add up to when that is more (sys.maxsize: no limit)."""
    now = present()
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler (a fixed cluster, a local Ray): only what is up
        most = {}
    return {key: max(now.get(key, 0.0), float(most.get(key, 0))) for key in set(now) | set(most)}


def capped(value: float, limit: int) -> int:
    """`value` as a count, at most `limit` (an autoscaler without a limit says sys.maxsize)."""
    return int(min(value, limit, sys.maxsize))


@dataclass(frozen=True)
class Wanted:
    """`count` placements of `per` (e.g. 2 x {"GPU": 1}) that a stage waits for."""

    what: str  # for messages: "model actor"
    per: dict[str, float]
    count: int = 1

    def satisfied(self, nodes: list[dict[str, float]]) -> bool:
        """Whether `count` bundles fit on the alive nodes' total resources (first fit)."""
        free = [dict(node) for node in nodes]
        for _ in range(self.count):
            for node in free:
                if all(node.get(key, 0.0) >= amount for key, amount in self.per.items()):
                    for key, amount in self.per.items():
                        node[key] -= amount
                    break
            else:
                return False
        return True

    def describe(self) -> str:
        shape = ", ".join(f"{amount:g} {key}" for key, amount in sorted(self.per.items()))
        return f"{self.count} {self.what}(s) of {shape} each"


def node_totals() -> list[dict[str, float]]:
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def wait_for(wanted: Wanted, seconds: float, progress=print) -> float:
    """Block until the cluster's nodes can hold `wanted`, asking the autoscaler for it while
    waiting; seconds waited. ResourcesUnavailable, in one line, after `seconds`."""
    began = time.monotonic()
    if wanted.satisfied(node_totals()):
        return 0.0
    request_from_autoscaler([wanted.per] * wanted.count)
    said = began
    try:
        while not wanted.satisfied(node_totals()):
            waited = time.monotonic() - began
            if waited >= seconds:
                have = ", ".join(f"{value:g} {key}" for key, value in sorted(present().items())
                                 if key in ("CPU", "GPU") or key in wanted.per) or "nothing"
                raise ResourcesUnavailable(
                    f"waited {seconds:g} s for {wanted.describe()} and the cluster still cannot place them "
                    f"(it has {have}); add such nodes, raise embed.wait_for_resources_s, or choose --device cpu")
            if time.monotonic() - said >= WAIT_MESSAGE_EVERY_S:
                said = time.monotonic()
                progress(f"waiting for {wanted.describe()}: {waited:.0f} s of at most {seconds:g} s")
            time.sleep(POLL_S)
    finally:
        request_from_autoscaler([])  # the pool's own demand takes over from here
    return time.monotonic() - began


def request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler to make room for `bundles` (an empty list withdraws the request).
    A cluster without an autoscaler ignores it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # not supported here: nothing scales, the wait alone decides
        pass
