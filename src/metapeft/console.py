"""Lazily created rich consoles: importing rich.console costs ~0.15-0.25 s, which would push
``metapeft --help`` past its 0.5 s budget, so the Console is built on first use."""

from __future__ import annotations


class LazyConsole:
    def __init__(self, stderr: bool = False):
        self._stderr = stderr
        self._console = None

    @property
    def real(self):
        if self._console is None:
            from rich.console import Console

            # soft_wrap: a long line (a command to paste, a path) is never broken by inserted
            # newlines; the terminal wraps it. Tables still fit the width.
            self._console = Console(stderr=self._stderr, soft_wrap=True)
        return self._console

    def __getattr__(self, name):
        return getattr(self.real, name)


out_console = LazyConsole()
err_console = LazyConsole(stderr=True)
