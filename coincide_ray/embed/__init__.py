"""Embedding stage: multi-head self-attention vectors from a small LVLM (DESIGN.md step 1)."""

from coincide_ray.embed.msa import default_layers, extract_msa_embeddings

__all__ = ["default_layers", "extract_msa_embeddings"]
