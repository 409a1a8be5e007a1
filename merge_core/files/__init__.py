"""Safe file I/O: lazy validated reads, atomic no-overwrite writes, metadata and recipes."""
from .atomic import atomic_write, inside
from .metadata import RECIPE_KEY, lora_metadata, make_recipe, sha256_of
from .tensor_source import TensorSource

__all__ = ["atomic_write", "inside", "RECIPE_KEY", "lora_metadata", "make_recipe", "sha256_of", "TensorSource"]
