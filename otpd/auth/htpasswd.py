"""Apache htpasswd files: loading, verification and safe updates.

Accepted hash formats are the ones Apache's ``htpasswd`` writes: bcrypt
(``$2y$``, also ``$2a$``/``$2b$``), ``$apr1$`` (Apache MD5-crypt, plus the
identical-but-for-the-magic ``$1$``) and ``{SHA}`` (base64 SHA-1, unsalted).
Plaintext, crypt(3) DES and anything unrecognised are refused: such users can
never log in and are listed in :attr:`HtpasswdFile.weak_entries`. A reader may
refuse more (``accept``): the REST API takes only salted hashes (bcrypt,
apr1), since an unsalted ``{SHA}`` entry falls to a lookup table once the file
leaks; ``otpd broker`` keeps ``{SHA}`` for PHP-era files.

Timing: an unknown (or refused) user costs the same work as the file's most
common real entry, so response times do not reveal which users exist.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import bcrypt

log = logging.getLogger(__name__)

Scheme = Literal["bcrypt", "md5crypt", "sha1"]
ALL_SCHEMES: Final[frozenset[Scheme]] = frozenset(("bcrypt", "md5crypt", "sha1"))
SALTED_SCHEMES: Final[frozenset[Scheme]] = frozenset(("bcrypt", "md5crypt"))

# bcrypt only looks at the first 72 bytes; Apache truncates the same way.
BCRYPT_MAX_BYTES: Final = 72
DEFAULT_COST: Final = 12

_BCRYPT_RE = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_MD5CRYPT_RE = re.compile(r"\$(apr1|1)\$([^$]{0,8})\$[./A-Za-z0-9]{22}")
_SHA_RE = re.compile(r"\{SHA\}[A-Za-z0-9+/]{27}=")

_ITOA64: Final = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

_CACHE_TTL: Final = 300.0
_CACHE_MAX: Final = 1024
# Concurrent bcrypt checks per file: keeps a login flood from starving the
# default thread pool (and a Pi's CPUs) that the rest of the daemon shares.
_BCRYPT_SLOTS: Final = 2
_RELOAD_CHECK_INTERVAL: Final = 1.0


class HtpasswdError(Exception):
    """A users file that cannot be used. Never contains hash or password text."""

    def __init__(self, path: str | os.PathLike[str], problems: Sequence[str]) -> None:
        self.path = os.fspath(path)
        self.problems = list(problems)
        super().__init__("\n".join(f"{self.path}: {p}" for p in self.problems))


@dataclass(frozen=True, slots=True)
class _Entry:
    hash: str
    scheme: Scheme | None  # None: refused (plaintext, DES, unknown)
    cost: int = 0  # bcrypt cost, for matching dummy work


# -- hash primitives ---------------------------------------------------------


def _to64(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ITOA64[value & 0x3F])
        value >>= 6
    return "".join(out)


def md5_crypt(password: bytes, salt: bytes, magic: bytes = b"$apr1$") -> str:
    """MD5-crypt as described by Poul-Henning Kamp (``$1$``); Apache's apr1 is
    the same algorithm with the magic string ``$apr1$``."""
    salt = salt.split(b"$", 1)[0][:8]
    alt = hashlib.md5(password + salt + password).digest()  # noqa: S324 - the format mandates MD5
    ctx = hashlib.md5(password + magic + salt)  # noqa: S324
    for remaining in range(len(password), 0, -16):
        ctx.update(alt[: min(16, remaining)])
    # One byte per bit of the length: a NUL for a set bit, else the first
    # password byte (the original's "memset(final, 0)" quirk).
    n = len(password)
    while n:
        ctx.update(b"\0" if n & 1 else password[:1])
        n >>= 1
    digest = ctx.digest()
    # 1000 rounds to slow down brute force (by 1990s standards).
    for i in range(1000):
        round_ = hashlib.md5()  # noqa: S324
        round_.update(password if i & 1 else digest)
        if i % 3:
            round_.update(salt)
        if i % 7:
            round_.update(password)
        round_.update(digest if i & 1 else password)
        digest = round_.digest()
    d = digest
    encoded = (
        _to64((d[0] << 16) | (d[6] << 8) | d[12], 4)
        + _to64((d[1] << 16) | (d[7] << 8) | d[13], 4)
        + _to64((d[2] << 16) | (d[8] << 8) | d[14], 4)
        + _to64((d[3] << 16) | (d[9] << 8) | d[15], 4)
        + _to64((d[4] << 16) | (d[10] << 8) | d[5], 4)
        + _to64(d[11], 2)
    )
    return f"{magic.decode()}{salt.decode('ascii', 'replace')}${encoded}"


def _classify(hash_: str) -> _Entry:
    if m := _BCRYPT_RE.fullmatch(hash_):
        return _Entry(hash_, "bcrypt", int(m.group(1)))
    if _MD5CRYPT_RE.fullmatch(hash_):
        return _Entry(hash_, "md5crypt")
    if _SHA_RE.fullmatch(hash_):
        return _Entry(hash_, "sha1")
    return _Entry(hash_, None)


def _utf8(text: str) -> bytes:
    # surrogatepass: a lone surrogate from a lenient decoder must fail the
    # check, not raise.
    return text.encode("utf-8", "surrogatepass")


def _bcrypt_bytes(password: str) -> bytes:
    return _utf8(password)[:BCRYPT_MAX_BYTES]


def _check(entry: _Entry, password: str) -> bool:
    """Check one password against one entry (blocking: bcrypt is slow)."""
    if entry.scheme == "bcrypt":
        try:
            return bcrypt.checkpw(_bcrypt_bytes(password), entry.hash.encode("ascii"))
        except ValueError:
            return False
    if entry.scheme == "md5crypt":
        magic, salt = entry.hash[1:].split("$", 2)[:2]
        computed = md5_crypt(_utf8(password), salt.encode("utf-8"), f"${magic}$".encode())
        return hmac.compare_digest(computed.encode(), entry.hash.encode())
    if entry.scheme == "sha1":
        digest = hashlib.sha1(_utf8(password)).digest()  # noqa: S324 - {SHA} format
        return hmac.compare_digest(digest, base64.b64decode(entry.hash[5:]))
    return False


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    """A bcrypt hash in the ``$2y$`` form that Apache's ``htpasswd -B`` writes.

    Raises ValueError for passwords over 72 UTF-8 bytes (bcrypt would silently
    ignore the rest) or a cost outside 4..31.
    """
    raw = password.encode("utf-8")
    if len(raw) > BCRYPT_MAX_BYTES:
        raise ValueError(f"password is longer than {BCRYPT_MAX_BYTES} bytes")
    if not 4 <= cost <= 31:
        raise ValueError("bcrypt cost must be 4..31")
    hashed = bcrypt.hashpw(raw, bcrypt.gensalt(cost, prefix=b"2b")).decode("ascii")
    # $2b$ and $2y$ name the same (fixed) algorithm; $2y$ is Apache's spelling.
    return "$2y$" + hashed[4:]


# -- parsing -----------------------------------------------------------------


def _parse(data: bytes) -> tuple[dict[str, _Entry], list[str]]:
    entries: dict[str, _Entry] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            problems.append(f"line {lineno}: not valid UTF-8")
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        user, sep, hash_ = line.partition(":")
        hash_ = hash_.strip()
        if not sep:
            problems.append(f"line {lineno}: expected USER:HASH (no ':' found)")
        elif not user:
            problems.append(f"line {lineno}: empty user name")
        elif not hash_:
            problems.append(f"line {lineno}: empty hash for user {user!r}")
        elif user in entries:
            problems.append(
                f"line {lineno}: duplicate user {user!r} (first on line {first_line[user]})"
            )
        else:
            entries[user] = _classify(hash_)
            first_line[user] = lineno
    return entries, problems


class HtpasswdFile:
    """An htpasswd users file held in memory; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], entries: dict[str, _Entry],
                 accept: frozenset[Scheme] = ALL_SCHEMES) -> None:
        self.path = Path(path)
        self._accept = accept
        entries = _refuse_others(entries, accept)
        self._entries = entries
        self._signature: tuple[int, int, int] | None = None
        self._cache_key = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, float] = OrderedDict()
        self._dummy_lock = threading.Lock()
        self._dummy: _Entry | None = None
        self._dummy_kind = _dominant_kind(entries)
        self._slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._inflight: dict[bytes, asyncio.Future[bool]] = {}
        self._next_reload_check = 0.0
        self._last_reload_error = ""

    # -- loading -------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str],
             accept: frozenset[Scheme] = ALL_SCHEMES) -> HtpasswdFile:
        """Read and validate ``path``; raises HtpasswdError (also for I/O errors).
        Entries hashed with a scheme outside ``accept`` are refused (weak)."""
        p = Path(path)
        entries, signature = cls._read(p)
        self = cls(p, entries, accept)
        self._signature = signature
        return self

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, _Entry], tuple[int, int, int]]:
        try:
            with path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read()
        except OSError as exc:
            raise HtpasswdError(path, [f"cannot read: {exc.strerror}"]) from None
        entries, problems = _parse(data)
        if problems:
            raise HtpasswdError(path, problems)
        return entries, (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> bool:
        """Re-read the file if it changed (mtime, size or inode); True if it did.

        Raises HtpasswdError and keeps the current users if the new file is bad.
        """
        try:
            st = self.path.stat()
        except OSError as exc:
            raise HtpasswdError(self.path, [f"cannot read: {exc.strerror}"]) from None
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._signature:
            return False
        entries, signature = self._read(self.path)
        entries = _refuse_others(entries, self._accept)
        with self._dummy_lock:
            self._entries = entries
            self._signature = signature
            self._dummy = None
            self._dummy_kind = _dominant_kind(entries)
        self._cache.clear()
        return True

    def _maybe_reload(self) -> None:
        """Throttled reload for the request path: a bad new version is logged
        once and the previous users stay in force."""
        now = time.monotonic()
        if now < self._next_reload_check:
            return
        self._next_reload_check = now + _RELOAD_CHECK_INTERVAL
        try:
            if self.reload():
                log.info("reloaded users file %s (%d users)", self.path, len(self._entries))
            self._last_reload_error = ""
        except HtpasswdError as exc:
            if str(exc) != self._last_reload_error:
                log.error("keeping previous users; cannot reload: %s", exc)
            self._last_reload_error = str(exc)

    # -- introspection -------------------------------------------------------
    @property
    def users(self) -> list[str]:
        return list(self._entries)

    @property
    def weak_entries(self) -> list[str]:
        """Users whose entry is refused (plaintext, crypt(3) DES, unknown, or a
        scheme this reader does not accept)."""
        return [u for u, e in self._entries.items() if e.scheme is None]

    # -- verification --------------------------------------------------------
    def _target(self, user: str) -> tuple[_Entry, bool]:
        """The entry to check against, and whether a match means success."""
        entry = self._entries.get(user)
        if entry is not None and entry.scheme is not None:
            return entry, True
        return self._dummy_entry(), False

    def _dummy_entry(self) -> _Entry:
        """An entry of the file's most common kind (and bcrypt cost) for a
        random password, so unknown users take as long as real ones."""
        with self._dummy_lock:
            if self._dummy is None:
                scheme, cost = self._dummy_kind
                junk = secrets.token_hex(16).encode()
                if scheme == "bcrypt":
                    hashed = bcrypt.hashpw(junk, bcrypt.gensalt(cost)).decode()
                elif scheme == "md5crypt":
                    hashed = md5_crypt(junk, secrets.token_hex(4).encode())
                else:
                    digest = hashlib.sha1(junk).digest()  # noqa: S324
                    hashed = "{SHA}" + base64.b64encode(digest).decode()
                self._dummy = _classify(hashed)
            return self._dummy

    def verify(self, user: str, password: str) -> bool:
        """Blocking check (bcrypt takes ~0.1-1 s); prefer :meth:`verify_async`."""
        entry, real = self._target(user)
        return _check(entry, password) and real

    def _cache_token(self, user: str, password: str) -> bytes:
        # Length-prefixed so that no other (user, password) split collides.
        name = _utf8(user)
        msg = len(name).to_bytes(4, "big") + name + _utf8(password)
        return hmac.new(self._cache_key, msg, hashlib.sha256).digest()

    def _cache_hit(self, token: bytes) -> bool:
        expiry = self._cache.get(token)
        if expiry is None:
            return False
        if expiry < time.monotonic():
            del self._cache[token]
            return False
        return True

    def _cache_store(self, token: bytes) -> None:
        self._cache[token] = time.monotonic() + _CACHE_TTL
        self._cache.move_to_end(token)
        while len(self._cache) > _CACHE_MAX:
            self._cache.popitem(last=False)

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots[0] is not loop:
            self._slots = (loop, asyncio.Semaphore(_BCRYPT_SLOTS))
        return self._slots[1]

    async def verify_async(self, user: str, password: str) -> bool:
        """Like :meth:`verify`, without blocking the event loop.

        Successful checks are remembered for ~5 minutes under an HMAC of
        user+password (random per-process key), so a client that logs in often
        costs one bcrypt per 5 minutes; the memory is dropped on reload.
        Concurrent identical checks share one computation.
        """
        self._maybe_reload()
        token = self._cache_token(user, password)
        if self._cache_hit(token):
            return True
        pending = self._inflight.get(token)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._inflight[token] = future
        entries_before = self._entries
        try:
            entry = self._entries.get(user)
            scheme = entry.scheme if entry is not None else None
            if (scheme or self._dummy_kind[0]) == "bcrypt":
                async with self._semaphore():
                    ok = await asyncio.to_thread(self.verify, user, password)
            else:
                ok = self.verify(user, password)
            # A reload during the check must not cache a result for old users.
            if ok and self._entries is entries_before:
                self._cache_store(token)
            future.set_result(ok)
            return ok
        except BaseException as exc:
            future.set_exception(exc)
            # Nobody else awaiting is fine: don't warn about an unretrieved error.
            future.exception()
            raise
        finally:
            del self._inflight[token]


def _refuse_others(entries: dict[str, _Entry], accept: frozenset[Scheme]) -> dict[str, _Entry]:
    return {user: e if e.scheme is None or e.scheme in accept else _Entry(e.hash, None)
            for user, e in entries.items()}


def _dominant_kind(entries: dict[str, _Entry]) -> tuple[Scheme, int]:
    kinds = Counter((e.scheme, e.cost) for e in entries.values() if e.scheme is not None)
    if not kinds:
        return "bcrypt", DEFAULT_COST
    (scheme, cost), _ = kinds.most_common(1)[0]
    assert scheme is not None
    return scheme, cost


# -- updating ----------------------------------------------------------------


def _check_user_name(user: str) -> None:
    if not user or ":" in user or user != user.strip() or any(ord(c) < 32 for c in user):
        raise ValueError(
            "user name must be non-empty, without ':', control characters or surrounding spaces"
        )
    if user.startswith("#"):
        raise ValueError("user name must not start with '#'")
    if len(user.encode("utf-8")) > 255:
        raise ValueError("user name is longer than 255 bytes")


def set_user(
    path: str | os.PathLike[str], user: str, password: str, *, cost: int = DEFAULT_COST
) -> bool:
    """Add or update ``user`` with a bcrypt hash of ``password``.

    The file is rewritten atomically (temporary file in the same directory,
    fsync, rename); other lines, comments included, are kept as they are. An
    existing file keeps its mode (and owner/group when allowed); a new file
    gets mode 0640. Returns True if the user was added, False if updated.
    """
    _check_user_name(user)
    target = Path(path)
    new_line = f"{user}:{hash_password(password, cost)}".encode()
    try:
        st: os.stat_result | None = target.stat()
        old = target.read_bytes()
    except FileNotFoundError:
        st, old = None, b""

    lines = old.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    prefix = user.encode("utf-8") + b":"
    out: list[bytes] = []
    replaced = False
    for line in lines:
        if line.startswith(prefix):
            if not replaced:
                out.append(new_line)
                replaced = True
            continue  # drop any duplicate of the same user
        out.append(line)
    if not replaced:
        out.append(new_line)

    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\n".join(out) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        if st is None:
            os.chmod(tmp, 0o640)
        else:
            os.chmod(tmp, st.st_mode & 0o7777)
            # Not root: the file becomes ours, with our primary group.
            with contextlib.suppress(PermissionError):
                os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return not replaced


__all__ = [
    "BCRYPT_MAX_BYTES",
    "DEFAULT_COST",
    "HtpasswdError",
    "HtpasswdFile",
    "hash_password",
    "md5_crypt",
    "set_user",
]
