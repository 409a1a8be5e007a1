"""Safe file I/O: lazy validated reads, atomic no-overwrite writes, metadata and recipes."""
from .atomic import atomic_folder, atomic_write, inside, refuse_existing
from .digests import sha256_of
from .metadata import RECIPE_KEY, lora_metadata, make_recipe
from .tensor_source import TensorSource

__all__ = ["atomic_folder", "atomic_write", "inside", "refuse_existing", "RECIPE_KEY", "lora_metadata", "make_recipe",
           "sha256_of", "TensorSource"]
