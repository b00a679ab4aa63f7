"""torch_reference: the PyTorch twin of flax_gpt's model and trainer.

Importing the package does not import torch; the model loads on first use.
"""

__all__ = ["GPT", "generate", "load", "save"]


def __getattr__(name):
    if name == "generate":
        from torch_reference.sample import generate

        return generate
    if name in __all__:
        from torch_reference import model

        return getattr(model, name)
    raise AttributeError(f"module 'torch_reference' has no attribute {name!r}")
