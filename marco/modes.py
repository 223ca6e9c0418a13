"""File permission modes as people and the wire write them: octal text ("0644", "755")."""

from __future__ import annotations

from .errors import BadRequest


def parse_mode(raw: str | int | None) -> int | None:
    """The mode `raw` names (octal text, or an int as YAML gives `mode: 0644`); None when none
    is given. Anything else, or bits beyond 07777, is a BadRequest."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):  # an int to Python, never a mode to a person
        raise BadRequest(f"mode must be octal, e.g. 0644 (got {raw!r})")
    if isinstance(raw, int):
        mode = raw
    else:
        try:
            mode = int(str(raw).strip(), 8)
        except ValueError:
            raise BadRequest(f"mode must be octal, e.g. 0644 (got {raw!r})") from None
    if not 0 <= mode <= 0o7777:
        raise BadRequest(f"mode must be between 0000 and 7777 (got {mode:o})")
    return mode


def format_mode(mode: int) -> str:
    """The wire spelling of a mode: four octal digits."""
    return f"{mode:04o}"
