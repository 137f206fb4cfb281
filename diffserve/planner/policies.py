"""The policy registry moved to :mod:`diffserve.policies` (a core module the CLI imports without
loading the solver); this name stays so that existing imports keep working."""

from diffserve.policies import (  # noqa: F401
    BUILTIN, OURS, POLICIES, STATIC, STATIC_POLICIES, BenchConfig, Policy, cascade_policies, choices_help, get, names,
    register, registered, unregister,
)
