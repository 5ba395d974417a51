"""Embedding stage: multi-head self-attention vectors from a small LVLM (DESIGN.md step 1).

The public functions are imported on first use: the CPU-side tasks (reuse checks,
preparation) import this package without paying for torch."""

__all__ = ["default_layers", "extract_msa_embeddings"]


def __getattr__(name: str):
    if name in __all__:
        from coincide_ray.embed import msa

        return getattr(msa, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
