"""Turn what a user types after ``--models`` into variant specs.

Accepted words (comma-separated, or a list): ``builtin`` (the whole tiny zoo), a built-in name
(``tiny-turbo`` or ``builtin:tiny-turbo``), a preset name of a real model from the paper
(``sd-turbo``, ``sdxs``, ``sd-v1.5``, ``sdxl``; loaded from the Hugging Face cache or hub), one of
the paper's architectures with random weights (``arch:sd-turbo`` ... ``arch:sdxl``, or ``arch`` for
all five), or a YAML file holding one variant, a list of variants, or ``{variants: [...]}``.
"""

from __future__ import annotations

from pathlib import Path

from diffserve.errors import UserError
from diffserve.fileio import parse_model, read_yaml
from diffserve.models.arch import ARCH_NAMES, PREFIX, arch_name, arch_variant, arch_variants
from diffserve.models.spec import VariantSpec
from diffserve.models.zoo import BUILTINS, builtin_variants

#: Real models of the paper, with the settings they are usually served with. Names match the
#: shipped reference profile, so a measured profile and the reference line up.
PRESETS: dict[str, VariantSpec] = {
    s.name: s
    for s in (
        VariantSpec(name="sd-turbo", source="stabilityai/sd-turbo", steps=1, guidance_scale=0.0, resolution=512, dtype="auto"),
        VariantSpec(name="sdxs", source="IDKiro/sdxs-512-0.9", steps=1, guidance_scale=0.0, resolution=512, dtype="auto"),
        VariantSpec(
            name="sd-v1.5", source="stable-diffusion-v1-5/stable-diffusion-v1-5", steps=50, guidance_scale=7.5,
            resolution=512, dtype="auto",
        ),
        VariantSpec(
            name="sdxl", source="stabilityai/stable-diffusion-xl-base-1.0", steps=50, guidance_scale=5.0,
            resolution=1024, dtype="auto",
        ),
    )
}


def load_variant_file(path: str | Path) -> list[VariantSpec]:
    """Variants from a YAML file: one mapping, a list of mappings, or ``{variants: [...]}``."""
    data = read_yaml(path, what="model variant file")
    if isinstance(data, dict) and set(data) == {"variants"}:
        data = data["variants"]
    items = data if isinstance(data, list) else [data]
    if not items or not all(isinstance(i, dict) for i in items):
        raise UserError(f"model variant file {path} must hold a variant mapping, a list of them, or 'variants: [...]'")
    return [parse_model(item, VariantSpec, what=f"model variant {i + 1} in {path}") for i, item in enumerate(items)]


def _looks_like_file(word: str) -> bool:
    return word.endswith((".yaml", ".yml")) or Path(word).is_file()


def resolve_variants(models: str | list[str]) -> list[VariantSpec]:
    """Specs for ``models`` in the order given, without duplicates; UserError for an unknown word."""
    words = models.split(",") if isinstance(models, str) else [w for m in models for w in str(m).split(",")]
    words = [w.strip() for w in words if w.strip()]
    if not words:
        raise UserError("no models given; use builtin, arch, a built-in, preset or arch:<name>, or a YAML variant file")
    specs: list[VariantSpec] = []
    for word in words:
        name = word.removeprefix("builtin:")
        if word == "builtin":
            specs.extend(builtin_variants())
        elif word == "arch":
            specs.extend(arch_variants())
        elif word.startswith(PREFIX):
            specs.append(arch_variant(arch_name(word)))
        elif name in BUILTINS:
            specs.extend(s for s in builtin_variants() if s.name == name)
        elif word in PRESETS:
            specs.append(PRESETS[word].model_copy())
        elif _looks_like_file(word):
            specs.extend(load_variant_file(word))
        else:
            raise UserError(
                f"unknown model {word!r}: not a built-in ({', '.join(BUILTINS)}), a preset "
                f"({', '.join(PRESETS)}), an architecture ({', '.join(PREFIX + n for n in ARCH_NAMES)}) "
                "or an existing YAML variant file"
            )
    seen: dict[str, VariantSpec] = {}
    for spec in specs:
        if spec.name in seen and seen[spec.name] != spec:
            raise UserError(f"two different variants are both named {spec.name!r}; give each a unique name")
        seen.setdefault(spec.name, spec)
    return list(seen.values())
