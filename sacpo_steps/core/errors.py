"""One exception type for bad user input, so every CLI reports it the same way."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input (config, data row, model folder, judge reply).

    The message names where the problem is: file, row (1-based line or record
    number) and field, so the user can fix it without reading a traceback.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        row: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.row = row
        self.field = field
        where = []
        if self.path is not None:
            where.append(self.path)
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
