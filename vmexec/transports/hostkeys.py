"""SSH host keys: OpenSSH's known_hosts file, read and appended, and the policy for an
offered key.

Owns one implementation of host-key pinning for every SSH client vmexec speaks with:
``transports.ssh`` (paramiko) and ``transports.ssh_async`` (asyncssh) hand it the key a
server offered, as its type and public blob, and it answers with the same rules and
messages for both. Keys are compared as blobs, so no SSH library is needed here.

known_hosts is read as OpenSSH writes it: comma-separated names, ``*``/``?`` patterns
and ``!`` negations, hashed names (``|1|salt|hmac``), ``@revoked`` markers. A line that
cannot be read (too few fields, bad base64, a key type vmexec's SSH clients do not
handle, ``@cert-authority``) is skipped, as OpenSSH does.

The policies follow OpenSSH's ``StrictHostKeyChecking``: ``"reject"`` (= ``yes``)
refuses a host whose key is not in known_hosts, ``"accept-new"`` appends an unknown key
and carries on. A key that differs from a known one is refused under every policy, and
so is a key marked ``@revoked``.

Imports only the standard library and vmexec.errors. Must not import: an SSH library
(paramiko lives in ``transports.ssh`` only), providers, scheduler, executor, protocol.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Any, Optional

from vmexec.errors import HostKeyError, TransportError

__all__ = [
    "HOST_KEY_POLICIES",
    "DEFAULT_KNOWN_HOSTS",
    "KnownHosts",
    "KnownKey",
    "check_host_key",
    "check_offered_host_key",
    "fingerprint_blob",
    "format_address",
    "known_host_keys",
    "lookup_name",
]

log = logging.getLogger(__name__)

HOST_KEY_POLICIES = ("reject", "accept-new")
DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"

# Key types a known_hosts line may name -> the type its public blob carries (the name
# the key goes by, e.g. in messages). The ones vmexec's SSH clients can check a host
# key of; a line of any other type is skipped. RSA keys are "ssh-rsa" whatever
# signature algorithm the line names.
_KEY_TYPES = {
    "ssh-ed25519": "ssh-ed25519",
    "ecdsa-sha2-nistp256": "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384": "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521": "ecdsa-sha2-nistp521",
    "ssh-rsa": "ssh-rsa",
    "rsa-sha2-256": "ssh-rsa",
    "rsa-sha2-512": "ssh-rsa",
}
_U32 = struct.Struct(">I")

# Appends to a known_hosts file from several connecting threads must not interleave.
_KNOWN_HOSTS_LOCK = threading.Lock()


def format_address(user: Optional[str], host: str, port: int) -> str:
    """Return ``user@host:port`` (IPv6 hosts in brackets), the label used in messages."""
    shown = f"[{host}]" if ":" in host else host
    return f"{user}@{shown}:{port}" if user else f"{shown}:{port}"


def fingerprint_blob(blob: bytes) -> str:
    """Return the OpenSSH-style fingerprint of a public key blob (``SHA256:...``)."""
    digest = hashlib.sha256(blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def lookup_name(host: str, port: int) -> str:
    """OpenSSH's known_hosts name: the bare host on port 22, ``[host]:port`` otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


def _expand(known_hosts: Optional[str]) -> str:
    return os.path.expanduser(known_hosts or DEFAULT_KNOWN_HOSTS)


def known_host_keys(known_hosts: Optional[str], host: str, port: int
                    ) -> list[tuple[str, bytes, bool]]:
    """The keys known_hosts holds for ``host:port``: ``(type, public blob, revoked)``."""
    known = KnownHosts.cached(_expand(known_hosts)).lookup(lookup_name(host, port))
    return [(k.key_type, k.blob, k.revoked) for k in known]


def check_offered_host_key(key_type: str, blob: bytes, *, known_hosts: Optional[str],
                           host: str, port: int, user: Optional[str], policy: str) -> None:
    """Check a host key a server offered against known_hosts (read afresh).

    Args:
        key_type: the key's type as the SSH library names it (``ssh-ed25519``, ...).
        blob: the key's public blob (SSH wire format).
        known_hosts: the known_hosts file (default ``~/.ssh/known_hosts``); missing
            means empty.
        host, port, user: whom the connection is for (names in known_hosts and in
            messages).
        policy: one of ``HOST_KEY_POLICIES``.

    Raises:
        HostKeyError: revoked, changed, or unknown under policy ``"reject"``. Under
            ``"accept-new"`` an unknown key is appended to known_hosts.
        TransportError: known_hosts exists but cannot be read.
    """
    path = _expand(known_hosts)
    name = lookup_name(host, port)
    check_host_key(key_type, blob, KnownHosts.load(path).lookup(name), lookup_name=name,
                   host=host, port=port, address=format_address(user, host, port),
                   path=path, policy=policy)


@dataclass
class KnownKey:
    """One key of a known_hosts line."""

    key_type: str  # the blob's own type: "ssh-rsa" for every RSA line
    blob: bytes
    lineno: int
    revoked: bool = False


def check_host_key(
    key_type: str,
    blob: bytes,
    known: list[KnownKey],
    *,
    lookup_name: str,
    host: str,
    port: int,
    address: str,
    path: str,
    policy: str,
) -> None:
    """Apply the policy to the key ``(key_type, blob)`` offered by ``address``, given the
    ``known`` keys of its known_hosts ``path`` (see ``check_offered_host_key``)."""
    key_type = _blob_type(blob) or key_type
    offered = f"{key_type} {fingerprint_blob(blob)}"
    if any(k.revoked and k.blob == blob for k in known):
        raise HostKeyError(
            f"the SSH host key of {address} ({offered}) is marked @revoked in {path}: "
            "refusing to connect. Ask the machine's owner for its current key."
        )
    trusted = [k for k in known if not k.revoked]
    if any(k.blob == blob for k in trusted):
        return
    if trusted:
        # A different key for a known host is refused under every policy, whatever its
        # type: accepting it is exactly what a man in the middle needs.
        had = "; ".join(
            f"{k.key_type} {fingerprint_blob(k.blob)} (line {k.lineno})" for k in trusted
        )
        raise HostKeyError(
            f"the SSH host key of {address} has CHANGED: {path} has {had}, the server "
            f"offered {offered}. This can be a man-in-the-middle attack or a reinstalled "
            "machine; vmexec never accepts a changed key. If the change is expected, "
            f"remove the old entry with `ssh-keygen -R '{lookup_name}' -f {path}` and "
            "connect again."
        )
    if policy == "accept-new":
        _append_known_host(path, lookup_name, key_type, blob)
        log.warning("ssh %s: added new host key %s to %s", address, offered, path)
        return
    raise HostKeyError(
        f"unknown SSH host key for {address} ({offered}): it is not in {path}. If this "
        f"is the right machine, add its key with `ssh-keyscan -p {port} {host} >> "
        f"{path}` (compare the fingerprint out of band), or pass "
        'host_key_policy="accept-new" to trust a host on first use.'
    )


def _append_known_host(path: str, lookup_name: str, key_type: str, blob: bytes) -> None:
    line = f"{lookup_name} {key_type} {base64.b64encode(blob).decode('ascii')}\n"
    directory = os.path.dirname(path)
    with _KNOWN_HOSTS_LOCK:
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        # Append, never rewrite: the file may hold comments, hashed names and markers
        # that a rewrite would lose.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as f:
            if f.tell() > 0 and not _ends_with_newline(path):
                f.write("\n")
            f.write(line)


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# --- reading known_hosts ---------------------------------------------------------


class KnownHosts:
    """The parts of an OpenSSH known_hosts file vmexec needs: lookup with hashed names,
    patterns and ``@revoked`` markers. A malformed line is skipped, as OpenSSH does."""

    def __init__(self, lines: list[tuple[int, list[str], str, KnownKey]]) -> None:
        self._lines = lines
        # Lines whose names are all plain (no pattern, negation or hash) are indexed by
        # name: a fleet's known_hosts has a line per machine, and a scan per connection
        # would make connecting N machines cost N² matches.
        self._exact: dict[str, list[tuple[int, KnownKey]]] = {}
        self._other: list[tuple[int, list[str], str, KnownKey]] = []
        for line in lines:
            lineno, names, marker, known = line
            if marker or any(n.startswith(("!", "|")) or "*" in n or "?" in n for n in names):
                self._other.append(line)
                continue
            for name in names:
                self._exact.setdefault(name.lower(), []).append((lineno, known))

    @classmethod
    def cached(cls, path: str) -> KnownHosts:
        """``load``, reused while the file's size and modification time are unchanged."""
        try:
            st = os.stat(path)
            stamp: tuple[Any, ...] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = ()
        with _KNOWN_HOSTS_LOCK:
            hit = _known_hosts_cache.get(path)
        if hit is not None and hit[0] == stamp and stamp:
            return hit[1]
        loaded = cls.load(path)
        with _KNOWN_HOSTS_LOCK:
            _known_hosts_cache[path] = (stamp, loaded)
        return loaded

    @classmethod
    def load(cls, path: str) -> KnownHosts:
        """Read ``path`` (missing: empty).

        Raises:
            TransportError: the file exists but cannot be read.
        """
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            return cls([])
        except OSError as exc:
            raise TransportError(f"cannot read known_hosts file {path}: {exc}") from exc
        lines = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            marker = ""
            if line.startswith("@"):
                marker, _, line = line.partition(" ")
                line = line.strip()
                if marker != "@revoked":  # @cert-authority: certificates unsupported
                    continue
            parsed = _parse_line(line)
            if parsed is None:
                log.debug("%s:%d: skipping unreadable known_hosts line", path, lineno)
                continue
            names, key_type, blob = parsed
            lines.append(
                (lineno, names, marker, KnownKey(key_type, blob, lineno, marker == "@revoked"))
            )
        return cls(lines)

    def lookup(self, name: str) -> list[KnownKey]:
        """The keys of every line naming ``name`` (and every ``@revoked`` key), in file
        order."""
        found = list(self._exact.get(name.lower(), ()))
        for lineno, names, marker, known in self._other:
            if marker == "@revoked" or _matches(name, names):
                found.append((lineno, known))
        found.sort(key=lambda entry: entry[0])  # file order, as a full scan gives
        return [known for _, known in found]


_known_hosts_cache: dict[str, tuple[tuple[Any, ...], KnownHosts]] = {}


def _parse_line(line: str) -> Optional[tuple[list[str], str, bytes]]:
    """``(names, key type, blob)`` of a known_hosts line without its marker, or None."""
    # Fields are split on each single space or tab, as paramiko read them before this
    # module did (a doubled separator makes an empty field, and the line is skipped).
    fields = re.split(" |\t", line)
    if len(fields) < 3:
        return None
    names, line_type, encoded = fields[:3]
    blob_type = _KEY_TYPES.get(line_type)
    if blob_type is None:
        return None
    try:
        blob = base64.decodebytes(encoded.encode("utf-8"))
    except (binascii.Error, ValueError):
        return None
    if not _well_formed(blob, blob_type):
        return None
    return names.split(","), blob_type, blob


def _ssh_strings(blob: bytes, count: int) -> Optional[list[bytes]]:
    """The first ``count`` length-prefixed strings of an SSH wire blob, or None."""
    out = []
    pos = 0
    for _ in range(count):
        if len(blob) - pos < 4:
            return None
        (size,) = _U32.unpack_from(blob, pos)
        pos += 4
        if len(blob) - pos < size:
            return None
        out.append(blob[pos : pos + size])
        pos += size
    return out


def _blob_type(blob: bytes) -> Optional[str]:
    strings = _ssh_strings(blob, 1)
    if not strings:
        return None
    try:
        return strings[0].decode("ascii")
    except UnicodeDecodeError:
        return None


def _well_formed(blob: bytes, key_type: str) -> bool:
    """Whether ``blob`` is a public key of ``key_type`` in SSH wire format."""
    if key_type == "ssh-ed25519":
        parts = _ssh_strings(blob, 2)
        return parts is not None and parts[0] == b"ssh-ed25519" and len(parts[1]) == 32
    if key_type == "ssh-rsa":  # e, n
        parts = _ssh_strings(blob, 3)
        return parts is not None and parts[0] == b"ssh-rsa" and bool(parts[1]) and bool(parts[2])
    parts = _ssh_strings(blob, 3)  # ecdsa: curve name, point
    return (parts is not None and parts[0] == key_type.encode("ascii")
            and parts[1] == key_type.rsplit("-", 1)[1].encode("ascii") and bool(parts[2]))


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    # OpenSSH patterns know only `*` and `?`; fnmatch would read "[host]:port" as a
    # character class.
    parts = (".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.compile("".join(parts))


def _hashed_name_matches(name: str, pattern: str) -> bool:
    """Whether ``|1|salt|hmac`` (OpenSSH's HashKnownHosts) names ``name``."""
    _, _, salt_b64, hash_b64 = (pattern.split("|") + ["", ""])[:4]
    try:
        salt = base64.b64decode(salt_b64, validate=True)
        expected = base64.b64decode(hash_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(salt) != hashlib.sha1().digest_size:
        return False
    digest = hmac.new(salt, name.encode("utf-8"), hashlib.sha1).digest()
    return hmac.compare_digest(digest, expected)


def _matches(name: str, patterns: list[str]) -> bool:
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern[1:] if negated else pattern
        if pattern.startswith("|1|"):
            hit = _hashed_name_matches(name, pattern)
        else:
            hit = _glob(pattern).fullmatch(name.lower()) is not None
        if hit and negated:
            return False
        matched = matched or hit
    return matched
