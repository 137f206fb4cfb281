"""The model layer: variant specs, the one loader every stage uses, and the built-in tiny zoo.

Importing this package is cheap; torch and diffusers load only when a model is built or loaded.
"""

from diffserve.models.catalog import PRESETS, load_variant_file, resolve_variants
from diffserve.models.registry import GenerationTimeout, LoadedModel, load_variant, set_torch_threads
from diffserve.models.spec import VariantSpec
from diffserve.models.zoo import RANDOM_WEIGHTS_MARKER, builtin_variants, cache_root, ensure_builtin

__all__ = [
    "PRESETS",
    "RANDOM_WEIGHTS_MARKER",
    "GenerationTimeout",
    "LoadedModel",
    "VariantSpec",
    "builtin_variants",
    "cache_root",
    "ensure_builtin",
    "load_variant",
    "load_variant_file",
    "resolve_variants",
    "set_torch_threads",
]
