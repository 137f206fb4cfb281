"""diffserve: serve text-to-image diffusion models with query-aware model cascades.

Data flows one way, each stage reading and writing a versioned YAML file:
profile (``profile.yaml``) -> build-cascade (``cascade.yaml``) -> plan (``plan.yaml``) -> serve.
"""

__version__ = "0.1.0"
