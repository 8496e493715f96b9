"""How the CLI shows what it did not write itself: strings from traces, and byte sizes.

A trace is a file someone else may have written. Every string read from one (task, status
reason, layer and module names, attributes, stray file names) or passed through from the user
goes through :func:`visible` before it reaches a terminal: control, format and separator
characters (an ESC that starts a terminal sequence, a right-to-left override, a newline) and
lone surrogates (which cannot be encoded) are shown as Python escapes (``\\x1b``, ``\\u202e``,
``\\udcff``). Where rich renders the text, :func:`markup` or :func:`plain` also keep ``[...]``
from being read as markup, so ``[blink red]fc1`` is printed as those characters.
"""

from __future__ import annotations

from rich.filesize import decimal
from rich.markup import escape
from rich.text import Text


def visible(value: object) -> str:
    """``str(value)`` with every character that is not printable shown as its Python escape
    (the space stays a space)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else _escape(ord(ch)) for ch in text)


_SHORT = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def _escape(code: int) -> str:
    if code in _SHORT:
        return _SHORT[code]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def markup(value: object) -> str:
    """:func:`visible`, escaped for inclusion in a rich markup string."""
    return escape(visible(value))


def plain(value: object) -> Text:
    """:func:`visible` as a rich ``Text``: rendered as the characters it holds, never markup."""
    return Text(visible(value))


def size(n: int) -> str:
    """A byte count for people: powers of 1000, as rich shows them (``1.2 MB``)."""
    return decimal(n)
