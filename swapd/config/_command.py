"""Turning a configured command string into an argv list (no shell involved)."""

from __future__ import annotations

_SPACE = " \t\n"
_DQUOTE_ESCAPABLE = '$`"\\\n'


def strip_comment_lines(text: str) -> str:
    """Drop every line whose first non-blank character is ``#``."""
    return "\n".join(line for line in text.split("\n") if not line.strip().startswith("#"))


def join_command_lines(text: str) -> str:
    """Remove comment lines and resolve trailing-backslash continuations.

    A line ending in ``\\`` (after trimming) loses the backslash and is
    followed by a space; other lines are kept as written.  Lines stay joined by
    newlines, which the splitter treats as ordinary whitespace.
    """
    kept: list[str] = []
    for line in text.split("\n"):
        trimmed = line.strip()
        if trimmed.startswith("#"):
            continue
        if trimmed.endswith("\\"):
            kept.append(trimmed[:-1] + " ")
        else:
            kept.append(line)
    return "\n".join(kept)


class CommandSyntaxError(ValueError):
    """The command text cannot be split (e.g. a quote is never closed)."""


def split_posix(text: str) -> list[str]:
    """Split ``text`` into words using POSIX shell quoting rules.

    Supports single quotes (literal), double quotes (backslash escapes only
    ``$ ` " \\`` and newline) and backslash escapes outside quotes.  Nothing is
    expanded: ``$VAR`` and ``${X}`` stay literal text.  Spaces, tabs and
    newlines separate words.
    """
    words: list[str] = []
    word: list[str] | None = None
    quote: str | None = None
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if quote is None:
            if ch == "\\":
                if i + 1 < n:
                    nxt = text[i + 1]
                    i += 2
                    if nxt == "\n":  # escaped newline: line continuation
                        continue
                    if word is None:
                        word = []
                    word.append(nxt)
                else:
                    i += 1  # a lone trailing backslash is dropped
                continue
            if ch in ("'", '"'):
                if word is None:
                    word = []
                quote = ch
                i += 1
                continue
            if ch in _SPACE:
                if word is not None:
                    words.append("".join(word))
                    word = None
                i += 1
                continue
            if word is None:
                word = []
            word.append(ch)
            i += 1
        elif quote == "'":
            if ch == "'":
                quote = None
            else:
                word.append(ch)  # type: ignore[union-attr]
            i += 1
        else:  # inside double quotes
            if ch == "\\" and i + 1 < n and text[i + 1] in _DQUOTE_ESCAPABLE:
                if text[i + 1] != "\n":
                    word.append(text[i + 1])  # type: ignore[union-attr]
                i += 2
                continue
            if ch == '"':
                quote = None
            else:
                word.append(ch)  # type: ignore[union-attr]
            i += 1
    if quote is not None:
        kind = "single" if quote == "'" else "double"
        raise CommandSyntaxError(f"unterminated {kind} quote")
    if word is not None:
        words.append("".join(word))
    return words


def command_to_argv(text: str) -> list[str]:
    """Comments dropped, continuations joined, then split into argv."""
    return split_posix(join_command_lines(text))
