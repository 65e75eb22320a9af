"""Typer + Rich command-line interface. The only place that imports Typer or Rich."""
