"""Selection stage: cluster scores, budget allocation, greedy MMD (DESIGN.md steps 3-5)."""

from coincide_ray.select.budget import allocate_budget
from coincide_ray.select.mmd import greedy_mmd_order, rank_cluster
from coincide_ray.select.scoring import transferability
from coincide_ray.select.selection import ClusterTable, Selection, select_from_clusters

__all__ = [
    "ClusterTable",
    "Selection",
    "allocate_budget",
    "greedy_mmd_order",
    "rank_cluster",
    "select_from_clusters",
    "transferability",
]
