"""The ``diffserve`` command line (Typer + Rich)."""
