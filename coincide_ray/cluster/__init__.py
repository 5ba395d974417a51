"""Clustering stage: spherical k-means (DESIGN.md step 2)."""

from coincide_ray.cluster.kmeans import KMeansResult, spherical_kmeans

__all__ = ["KMeansResult", "spherical_kmeans"]
