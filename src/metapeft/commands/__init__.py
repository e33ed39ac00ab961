"""Command groups registered onto the main Typer app (see ``register`` in each module)."""
