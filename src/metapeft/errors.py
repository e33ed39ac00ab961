"""The one user-facing error type.

Anything the user can fix (a bad file, an unknown method, a mismatched init) raises ``UserError``.
The CLI prints it as a single line and exits with code 2; everything else is a bug and may traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: names the file, line and field where known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.field = field
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = ""
        if self.path:
            where = str(self.path)
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        field = f"field '{self.field}': " if self.field else ""
        return f"{where}{field}{self.message}"
