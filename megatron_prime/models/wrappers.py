"""The model inside the wrappers that training puts around it (DDP, Float16Module)."""

from __future__ import annotations


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (``model`` itself if unwrapped)."""
    while hasattr(model, "module"):
        model = model.module
    return model
