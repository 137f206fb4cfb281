"""Quality scoring, the discriminator and the measured cascade curves (``diffserve score`` / ``build-cascade``).

Public entry points: :func:`build.build_cascade`, :func:`scoring.score_variants`,
:mod:`discriminator` (training; the server loads discriminators with
:func:`diffserve.models.discriminator.load_discriminator`).
Submodules import torch and open_clip lazily, so importing this package stays cheap.
"""
