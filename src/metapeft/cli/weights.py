"""``metapeft weights list | show | compare | rollback | delete``: the meta-weights registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from metapeft.cli._common import REGISTRY_OPT, out_console, print_json, user_errors

JSON_LIST_OPT = typer.Option(False, "--json", help="Print JSON.")
LIST_COLUMNS = ("name", "version", "latest", "method", "algorithm", "base_model", "created",
                "num_tasks")


def _print_object(obj, as_json: bool) -> None:
    if as_json:
        print_json(obj)
    else:
        out_console.print_json(json.dumps(obj, default=str))


def weights_list(registry: Optional[Path] = REGISTRY_OPT, as_json: bool = JSON_LIST_OPT):
    """List every name and version."""
    with user_errors():
        from rich.table import Table

        from metapeft import api

        rows = api.list_weights(registry)
        if as_json:
            print_json(rows)
            return
        t = Table(title=f"meta-weights in {api.registry_root(registry)}")
        for c in LIST_COLUMNS:
            t.add_column(c)
        for r in rows:
            t.add_row(*[str(r.get(c, "")) for c in LIST_COLUMNS])
        out_console.print(t)


def weights_show(spec: str, registry: Optional[Path] = REGISTRY_OPT,
                 as_json: bool = JSON_LIST_OPT):
    """Show one version's metadata (NAME or NAME@VERSION)."""
    with user_errors():
        from metapeft import api

        _print_object(api.show_weights(spec, registry), as_json)


def weights_compare(a: str, b: str, registry: Optional[Path] = REGISTRY_OPT,
                    as_json: bool = JSON_LIST_OPT):
    """Compare two versions: metadata differences and parameter distance."""
    with user_errors():
        from metapeft import api

        _print_object(api.compare_weights(a, b, registry), as_json)


def weights_rollback(name: str, version: str, registry: Optional[Path] = REGISTRY_OPT):
    """Make an earlier version the latest (nothing is deleted)."""
    with user_errors():
        from metapeft import api

        out_console.print(f"{name}: latest is now v{api.rollback_weights(name, version, registry)}")


def weights_delete(spec: str, registry: Optional[Path] = REGISTRY_OPT):
    """Delete NAME@VERSION, or every version of NAME."""
    with user_errors():
        from metapeft import api

        out_console.print(f"deleted {api.delete_weights(spec, registry)}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Manage meta-weights in the local registry.", no_args_is_help=True)
    for name, fn in (("list", weights_list), ("show", weights_show),
                     ("compare", weights_compare), ("rollback", weights_rollback),
                     ("delete", weights_delete)):
        group.command(name)(fn)
    app.add_typer(group, name="weights")
