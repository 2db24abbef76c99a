"""Keep secrets out of logs and status pages.

Backend commands often carry credentials: llama-server's ``--api-key``, a hub
token passed as ``env HF_TOKEN=...`` or ``docker run -e HF_TOKEN=...``, a
password in a URL. swapd logs and shows commands (``/running``, ``/logs``,
``/api/events``) and proxy URLs, so it masks their secret parts first:

- the value of a flag whose name says it is secret (``--api-key VALUE``,
  ``--api-key=VALUE``, ``--hf-token``, ``--password``, ``--client-secret``);
- the value of a ``NAME=VALUE`` argument whose name says it is secret
  (``HF_TOKEN``, ``*_KEY``, ``*_TOKEN``, ``*_SECRET``, ``*PASSWORD*``);
- the ``user:password@`` part of any URL, and URL query values with secret names;
- the same inside one argument that holds a whole command line
  (``sh -c "llama-server --api-key ..."``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "REDACTED"

# A name's words, split on - _ . and lowercased, say whether its value is secret.
_SECRET_WORDS = frozenset({"password", "passwd", "secret", "apikey", "credential", "credentials"})
_SECRET_LAST_WORDS = frozenset({"token", "key", "pass", "pwd", "auth"})
_WORD_SPLIT = re.compile(r"[-_.]+")

# An environment-style assignment: HF_TOKEN=abc (no dots, so llama-server's
# ``--override-kv tokenizer.ggml.add_bos_token=bool:false`` is left alone).
_ASSIGNMENT = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", re.DOTALL)
_FLAG = re.compile(r"^--?([A-Za-z][\w.-]*)$")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#@\s]*)@")
_TOKEN = re.compile(r"\S+")


def is_secret_name(name: str) -> bool:
    """Whether a flag, variable or query parameter called ``name`` holds a secret.

    ``--api-key``, ``--hf-token``, ``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``,
    ``DB_PASSWORD`` do; ``--max-num-batched-tokens``, ``--tokenizer``,
    ``MAX_TOKENS`` do not.
    """
    words = [w for w in _WORD_SPLIT.split(name.lower().lstrip("-")) if w]
    if not words or words[0] == "no" or words == ["pwd"]:  # --no-auth is a switch; PWD a directory
        return False
    if words[-1] in _SECRET_LAST_WORDS:
        return True
    if any(w in _SECRET_WORDS or "password" in w or "passwd" in w for w in words):
        return True
    return any(a == "api" and b == "key" for a, b in zip(words, words[1:], strict=False))


def redact_url(url: str) -> str:
    """``url`` with its ``user:password@`` part and secret query values masked."""
    if not url:
        return url
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", url)
    if "?" not in text:
        return text
    try:
        parts = urlsplit(text)
        pairs = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return text
    if not any(is_secret_name(k) for k, _ in pairs):
        return text
    query = urlencode([(k, MASK if is_secret_name(k) else v) for k, v in pairs], safe=MASK)
    return urlunsplit(parts._replace(query=query))


def _is_value_flag(arg: str) -> bool:
    """A secret flag whose value is the next argument (``--api-key VALUE``)."""
    match = _FLAG.match(arg)
    return match is not None and is_secret_name(match[1])


def _redact_one(arg: str) -> str:
    """One argument on its own: ``--flag=VALUE``, ``NAME=VALUE``, URLs, embedded command lines."""
    if "=" in arg:
        flag, _, _value = arg.partition("=")
        if _FLAG.match(flag) and is_secret_name(flag):
            return f"{flag}={MASK}"
        assignment = _ASSIGNMENT.match(arg)
        if assignment and is_secret_name(assignment[1]):
            return f"{assignment[1]}={MASK}"
    if any(ch.isspace() for ch in arg):
        return _redact_words(arg)
    if "://" in arg:
        return redact_url(arg)
    return arg


def _redact_words(text: str) -> str:
    """A command line in one string, redacted word by word, keeping its spacing."""
    out: list[str] = []
    pos = 0
    mask_next = False
    for match in _TOKEN.finditer(text):
        word = match.group()
        out.append(text[pos : match.start()])
        pos = match.end()
        stripped = word.strip("'\"")
        if mask_next:
            mask_next = False
            if not stripped.startswith("--"):
                quote = word[0] if word[0] in "'\"" else ""
                out.append(f"{quote}{MASK}{quote}")
                continue
        if _is_value_flag(stripped):
            out.append(word)
            mask_next = True
            continue
        redacted = _redact_one(stripped)
        out.append(word if redacted == stripped else word.replace(stripped, redacted, 1))
    out.append(text[pos:])
    return "".join(out)


def redact_argv(argv: Iterable[str]) -> list[str]:
    """A copy of ``argv`` with secret values masked (see the module's docstring)."""
    out: list[str] = []
    mask_next = False
    for arg in argv:
        if mask_next:
            mask_next = False
            if not arg.startswith("--"):  # a secret flag used as a switch takes no value
                out.append(MASK)
                continue
        if _is_value_flag(arg):
            out.append(arg)
            mask_next = True
            continue
        out.append(_redact_one(arg))
    return out
