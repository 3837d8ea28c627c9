"""Thin Typer command-line skins over the embedcache and probes Python APIs."""
