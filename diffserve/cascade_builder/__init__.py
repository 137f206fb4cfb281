"""Quality scoring, the discriminator and the measured cascade curves (``diffserve score`` / ``build-cascade``).

Public entry points: :func:`build.build_cascade`, :func:`scoring.score_variants`,
:func:`discriminator.load_discriminator` (used by the server's real backend).
Submodules import torch and open_clip lazily, so importing this package stays cheap.
"""
