"""Command line: ``free …`` or ``python -m free …``.

Every command takes Hydra overrides as trailing arguments (``experiment=tiny dataset.image_size=32``),
composed over ``params/``. Errors are one readable line on stderr: exit 2 for a bad configuration,
1 for missing or corrupt data or a service that cannot start. One module per command group:
``main`` (config, data, stages), ``stack`` (+ promote), ``serve``, ``bench``, ``track`` (register);
``common`` is shared.
"""

from free.cli.bench import bench_app
from free.cli.main import app
from free.cli.serve import serve_app
from free.cli.stack import promote, stack_app
from free.cli.track import register

app.add_typer(stack_app, name="stack")
app.command()(promote)
app.command()(register)
app.add_typer(serve_app, name="serve")
app.add_typer(bench_app, name="bench")

__all__ = ["app"]
