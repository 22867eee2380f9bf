"""What every ``free`` command group shares: the consoles, the overrides argument, the error contract
(one readable paragraph on stderr: exit 2 for a bad configuration, 1 for missing or corrupt inputs, a
disk that cannot take the outputs, or a service that cannot start), and the config a command composes
(``--params`` file or ``params/``)."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

out = Console(soft_wrap=True)
err = Console(stderr=True)
Overrides = Annotated[
    list[str] | None, typer.Argument(help="Hydra overrides, e.g. experiment=tiny dataset.image_size=32")
]
F = TypeVar("F", bound=Callable[..., object])

#: An ``OSError`` with one of these causes is a disk that cannot take a write, wherever it came from
#: (our writers raise ``StorageError`` themselves; this catches the libraries' own writes).
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def friendly_errors(command: F) -> F:
    """Turn the errors a user can fix into one line on stderr and a non-zero exit code."""
    from free.artifacts import StorageError, storage_error
    from free.checkpoints import CheckpointError
    from free.config import ConfigError
    from free.data import DatasetIntegrityError

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except StorageError as e:  # before FileNotFoundError: both are OSErrors
            err.print(f"[bold red]storage error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except ConfigError as e:
            err.print(f"[bold red]config error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except (FileNotFoundError, DatasetIntegrityError, CheckpointError) as e:  # missing/corrupt inputs
            kind = "checkpoint error" if isinstance(e, CheckpointError) else "data error"
            err.print(f"[bold red]{kind}:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except OSError as e:
            if e.errno not in DISK_ERRNOS:
                raise
            message = storage_error(e.filename or "a file", e)  # a library's write may not name it
            err.print(f"[bold red]storage error:[/] {message}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def stack_errors(command: F) -> F:
    """A service that cannot start: one paragraph with its log tail on stderr, exit 1."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        from free.stack import StackError

        try:
            return command(*args, **kwargs)
        except StackError as e:
            err.print(f"[bold red]stack error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


# Set by the global --params option: stages read a resolved params file (how DVC runs them).
params_file: Path | None = None


def compose_config(overrides: list[str] | None):
    from free.config import compose, load_params

    if params_file is not None:
        return load_params(params_file, overrides or [])
    return compose(overrides or [])
