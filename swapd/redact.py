"""Keep secrets out of logs and status pages.

Backend commands often carry credentials (llama-server's ``--api-key``, a
hub token); swapd logs and shows commands, so their values are masked.
"""

from __future__ import annotations

import re

MASK = "REDACTED"
_SECRET_FLAG = re.compile(r"^--?[\w.-]*(api[-_]?key|token|secret|passw(or)?d|auth|credential)[\w.-]*$", re.IGNORECASE)


def redact_argv(argv) -> list[str]:
    """A copy of ``argv`` with the values of secret-looking flags masked."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            out.append(MASK)
            mask_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if _SECRET_FLAG.match(flag):
            if eq:
                out.append(f"{flag}={MASK}")
            else:
                out.append(arg)
                mask_next = True
            continue
        out.append(arg)
    return out
