"""Names that become paths: one safe path component each.

A sweep's name, its members' names (given or derived from the grid) and a run folder
named after a preset each become ONE folder or file name under the output folder. They
must not climb out of it or hide: `safe_component` refuses what is not a plain name.
"""

from __future__ import annotations

#: longest name (in UTF-8 bytes) that the usual file systems accept as one component
MAX_BYTES = 255


def problem(name) -> str | None:
    """Why `name` is not a single safe path component, or None when it is one."""
    if not isinstance(name, str):
        return f"must be a string, got {type(name).__name__}"
    if not name:
        return "must not be empty"
    if name in (".", ".."):
        return "must not be '.' or '..'"
    if "/" in name or "\\" in name:
        return "must be one path component (no '/' or '\\')"
    if _drive(name):
        return "must not be an absolute path (it names a drive)"
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in name):
        return "must not hold control characters"
    if name.startswith("-"):
        return "must not start with '-' (it would read as an option)"
    if name != name.strip():
        return "must not start or end with white space"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"is longer than {MAX_BYTES} bytes (the file system's limit for one name)"
    return None


def safe_component(name, what: str, error=ValueError) -> str:
    """`name` if it is a single safe path component, else raise `error` (one line naming
    `what`): no '/', '\\', '.', '..', absolute path, empty name, control character,
    leading '-', surrounding white space, or more than 255 bytes."""
    why = problem(name)
    if why:
        shown = name if not isinstance(name, str) or len(name) <= 60 else name[:40] + "..."
        raise error(f"{what} {shown!r} {why}")
    return name


def relative_inside(path, what: str, error=ValueError) -> str:
    """`path` (a string from a file, e.g. a spec's `out`) if it is a relative path whose
    every component is safe (`safe_component`), else raise `error` (one line)."""
    if not isinstance(path, str):
        raise error(f"{what} must be a string, got {type(path).__name__}")
    if not path:
        raise error(f"{what} must not be empty")
    if path.startswith(("/", "\\")) or _drive(path):
        raise error(f"{what} {path!r} must be a relative path (pass --out for another place)")
    for part in path.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        why = problem(part)
        if why:
            raise error(f"{what} {path!r}: component {part!r} {why}")
    return path


def _drive(text: str) -> bool:
    """Does `text` start with a Windows drive (`C:`)?"""
    return len(text) >= 2 and text[1] == ":" and text[0].isascii() and text[0].isalpha()
