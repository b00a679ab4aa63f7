"""flax_gpt: a GPT-style language model in JAX/Flax, held numerically equal to a PyTorch twin.

Importing the package imports neither jax nor torch nor torchtext: the framework-free core
(`flax_gpt.core`) stays light, and the Flax model loads on first use. README's "Layout"
section says which module holds what.
"""

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "generate", "load", "save"]


def __getattr__(name):
    if name in ("GPT", "load", "save"):
        from flax_gpt import model

        return getattr(model, name)
    if name == "generate":
        from flax_gpt.sample import generate

        return generate
    if name == "GPTConfig":
        from flax_gpt.core.config import GPTConfig

        return GPTConfig
    raise AttributeError(f"module 'flax_gpt' has no attribute {name!r}")
