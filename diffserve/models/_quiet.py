"""Silence diffusers' and transformers' own progress bars and chatter while we load or save.

diffserve draws its own Rich progress; nested tqdm bars from the libraries would garble it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' own load progress bars and chatter during a load."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    import warnings

    d_level, t_level = dlog.get_verbosity(), tlog.get_verbosity()
    d_bars, t_bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # torch_dtype is renamed dtype in new diffusers; the old name works on every version we support
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        dlog.set_verbosity(d_level)
        tlog.set_verbosity(t_level)
        if d_bars:
            dlog.enable_progress_bar()
        if t_bars:
            tlog.enable_progress_bar()
