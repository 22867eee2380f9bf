"""``python -m free …`` is the same as the ``free`` command."""

from free.cli import app

app(prog_name="free")
