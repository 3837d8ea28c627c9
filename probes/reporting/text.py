"""Any id or label text made safe for one line of a table, a tile caption or a console row."""

from __future__ import annotations

from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# C0 and C1 control characters, DEL and the Unicode line / paragraph separators: shown as escapes
_CONTROL = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029]
_TABLE = {c: _NAMED.get(chr(c), f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROL}


def one_line(value: Any) -> str:
    """``str(value)`` with every control character written as an escape (``\\n``, ``\\x00``).

    Linear in the length; the result never breaks a line, so a caption, an HTML cell or a
    console table row stays one row whatever the cell id or label holds.
    """
    return str(value).translate(_TABLE)
