"""swapd's ``allowedHosts``: extra names a keyless swapd answers to.

Without ``apiKeys`` swapd answers only requests whose ``Host`` is a name that
cannot be a DNS rebinding attack (see :mod:`swapd.server.webguard`); this key
adds names, for example the one Nginx serves it under. Each entry is a host
name (any port matches), ``.example.com`` for that domain and every name
under it, or ``*`` to switch the check off.
"""

from __future__ import annotations

import ipaddress
import re

_NAME = re.compile(r"^\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*$")


def parse_allowed_hosts(ctx, top) -> tuple[str, ...]:
    """The normalised ``allowedHosts`` list; a bad entry fails with its key."""
    out: list[str] = []
    for index, raw in enumerate(top.str_list("allowedHosts")):
        key = f"allowedHosts[{index}]"
        entry = raw.strip().lower()
        if entry.endswith(".") and entry != ".":
            entry = entry[:-1]
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        if entry == "":
            ctx.fail("must not be empty", None, key)
        if "://" in entry or "/" in entry:
            ctx.fail(f"expected a host name, not a URL: {raw!r}", None, key)
        try:
            ipaddress.ip_address(entry)
        except ValueError:
            if entry != "*" and not _NAME.match(entry):
                hint = "; give the name without a port (every port matches)" if ":" in entry else ""
                ctx.fail(f"expected a host name, '.domain' or '*', got {raw!r}{hint}", None, key)
        if entry not in out:
            out.append(entry)
    return tuple(out)
