"""htpasswd parsing, verification against independent vectors, and updates."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from pathlib import Path

import pytest

from otpd.auth import htpasswd
from otpd.auth.htpasswd import HtpasswdError, HtpasswdFile, hash_password, md5_crypt, set_user

# openwall crypt_blowfish test vectors (cost 05, which is also `htpasswd -B`'s
# default), written with Apache's $2y$ prefix.
BCRYPT_VECTORS = [
    ("$2y$05$CCCCCCCCCCCCCCCCCCCCC.E5YPO9kmyuRGyh0XouQYb4YMJKvyOeW", "U*U"),
    ("$2y$05$CCCCCCCCCCCCCCCCCCCCC.VGOzA784oUp/Z0DY336zx7pLYAy0lwK", "U*U*"),
    ("$2y$05$XXXXXXXXXXXXXXXXXXXXXOAcXxm9kjPGEMsLznoKqmqw7tc8WCx4a", "U*U*U"),
    ("$2y$05$CCCCCCCCCCCCCCCCCCCCC.7uG0VCzI2bS7j6ymqJi9CdcdxiRTWNy", ""),
]

# `openssl passwd -apr1 -salt SALT PASSWORD` (OpenSSL 3.0) and `-1` for $1$.
MD5CRYPT_VECTORS = [
    ("$apr1$abcdefgh$FBwExRW4dCc8aL.OvjpIE1", "password"),
    ("$apr1$abcdefgh$MbEluLWKUabdhHWRIScTG.", "p@ss:w0rd"),
    ("$apr1$abcdefgh$L.PT565ESX4Tp2bqNs7Ie.", ""),
    ("$apr1$Xy3.z/Q1$GpFC1KaH0YHtXFLiDcQGC1", "password"),
    ("$apr1$Xy3.z/Q1$KfVDkHnMtudPV8KqHtvdJ/", "p@ss:w0rd"),
    ("$apr1$Xy3.z/Q1$STXQJw9nM0V825X2/w0Yo0", ""),
    ("$apr1$saltsalt$yAAkm4libquA.ZWLHbSBq/", "password"),
    ("$apr1$saltsalt$./F0DJSaFnBpImgmiVTLS0", "p@ss:w0rd"),
    ("$apr1$saltsalt$a8ml/vK5HEjiZ5oypDWA7/", ""),
    ("$apr1$ab$lZvtRnTeBDZ7tuojBMgqZ.", "Ünïcødé"),
    (
        "$apr1$short$3XLIfdNp23AigmPPdd0hT1",
        "a-very-long-password-that-is-longer-than-sixteen-bytes-for-sure",
    ),
    ("$1$saltsalt$qjXMvbEw8oaL.CzflDtaK/", "password"),
]

# `htpasswd -s`: base64(SHA-1("password")).
SHA_VECTOR = ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "password")


def write(tmp_path: Path, text: str, name: str = "users") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("expected", "password"), MD5CRYPT_VECTORS)
def test_md5_crypt_matches_openssl(expected: str, password: str) -> None:
    magic, salt = expected[1:].split("$")[:2]
    assert md5_crypt(password.encode(), salt.encode(), f"${magic}$".encode()) == expected


def test_md5_crypt_truncates_salt_to_eight() -> None:
    assert md5_crypt(b"password", b"abcdefghIJK").startswith("$apr1$abcdefgh$")
    assert md5_crypt(b"password", b"abcdefghIJK") == MD5CRYPT_VECTORS[0][0]


@pytest.mark.parametrize(
    ("hash_", "password"),
    [*BCRYPT_VECTORS, *MD5CRYPT_VECTORS, SHA_VECTOR],
)
def test_verify_vectors(tmp_path: Path, hash_: str, password: str) -> None:
    users = HtpasswdFile.load(write(tmp_path, f"alice:{hash_}\n"))
    assert users.verify("alice", password)
    assert not users.verify("alice", password + "x")
    assert not users.verify("bob", password)
    assert users.weak_entries == []


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_bcrypt_prefixes(tmp_path: Path, prefix: str) -> None:
    hash_ = prefix + BCRYPT_VECTORS[0][0][4:]
    users = HtpasswdFile.load(write(tmp_path, f"alice:{hash_}\n"))
    assert users.verify("alice", "U*U")
    assert not users.verify("alice", "U*V")


def test_plaintext_des_and_unknown_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "plain:secret\n"
        "des:abJnggxhB/yWI\n"  # crypt(3) DES
        "argon:$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n"
        f"good:{SHA_VECTOR[0]}\n",
    )
    users = HtpasswdFile.load(path)
    assert sorted(users.weak_entries) == ["argon", "des", "plain"]
    assert not users.verify("plain", "secret")
    assert not users.verify("des", "abJnggxhB/yWI")
    assert not users.verify("plain", "plain:secret")
    assert users.verify("good", "password")


def test_comments_blank_lines_crlf(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "# users\r\n\r\n   \r\n"
        f"alice:{SHA_VECTOR[0]}\r\n"
        f"  # indented comment\nbob:{MD5CRYPT_VECTORS[0][0]}  \n",
    )
    users = HtpasswdFile.load(path)
    assert users.users == ["alice", "bob"]
    assert users.verify("alice", "password")
    assert users.verify("bob", "password")


def test_malformed_lines_reported_without_hashes(tmp_path: Path) -> None:
    secret_hash = MD5CRYPT_VECTORS[0][0]
    path = tmp_path / "users"
    path.write_bytes(
        (
            f"alice:{secret_hash}\nno-colon-here\n:{secret_hash}\ncarol:\nalice:{SHA_VECTOR[0]}\n"
        ).encode()
        + b"dave:\xff\xfe\n"
    )
    with pytest.raises(HtpasswdError) as info:
        HtpasswdFile.load(path)
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "line 2",
        "line 3",
        "line 4",
        "line 5",
        "line 6",
    ]
    assert "duplicate user 'alice' (first on line 1)" in problems[3]
    text = str(info.value)
    assert secret_hash not in text
    assert SHA_VECTOR[0] not in text
    assert "no-colon-here" not in text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(HtpasswdError, match="cannot read"):
        HtpasswdFile.load(tmp_path / "absent")


def test_hash_password_format_and_limits() -> None:
    hashed = hash_password("s3cret: with colon", cost=4)
    assert hashed.startswith("$2y$04$") and len(hashed) == 60
    assert hash_password("x", cost=5)[:7] == "$2y$05$"
    with pytest.raises(ValueError, match="72"):
        hash_password("a" * 73, cost=4)
    with pytest.raises(ValueError, match="cost"):
        hash_password("x", cost=3)


def test_long_password_truncated_like_apache(tmp_path: Path) -> None:
    # Apache's bcrypt ignores bytes after the 72nd; so do we, instead of failing.
    hashed = hash_password("a" * 72, cost=4)
    users = HtpasswdFile.load(write(tmp_path, f"u:{hashed}\n"))
    assert users.verify("u", "a" * 72)
    assert users.verify("u", "a" * 72 + "ignored")
    assert not users.verify("u", "a" * 71)


def test_set_user_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert set_user(path, "alice", "first", cost=4) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert set_user(path, "bob", "pw:with:colons", cost=4) is True
    users = HtpasswdFile.load(path)
    assert users.verify("alice", "first")
    assert users.verify("bob", "pw:with:colons")

    # Update keeps other lines (comments too), order and a changed mode.
    text = path.read_text()
    path.write_text("# keep me\n" + text)
    path.chmod(0o600)
    assert set_user(path, "alice", "second", cost=4) is False
    lines = path.read_text().splitlines()
    assert lines[0] == "# keep me"
    assert [line.split(":")[0] for line in lines[1:]] == ["alice", "bob"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    users = HtpasswdFile.load(path)
    assert users.verify("alice", "second")
    assert not users.verify("alice", "first")
    assert users.verify("bob", "pw:with:colons")
    assert [p.name for p in tmp_path.iterdir()] == ["users"]  # no temp files left


@pytest.mark.parametrize("bad", ["", "a:b", " lead", "new\nline", "#hash"])
def test_set_user_rejects_bad_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        set_user(tmp_path / "users", bad, "pw", cost=4)
    assert not (tmp_path / "users").exists()


def test_reload_only_when_changed(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "one", cost=4)
    users = HtpasswdFile.load(path)
    assert users.reload() is False
    set_user(path, "alice", "two", cost=4)
    assert users.reload() is True
    assert users.verify("alice", "two")
    assert not users.verify("alice", "one")


def test_reload_keeps_users_on_bad_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice:{SHA_VECTOR[0]}\n")
    users = HtpasswdFile.load(path)
    path.write_text("garbage line\n")
    with pytest.raises(HtpasswdError):
        users.reload()
    assert users.verify("alice", "password")


async def test_verify_async_cache_accepts_only_right_password(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "right", cost=4)
    users = HtpasswdFile.load(path)
    assert await users.verify_async("alice", "right")
    assert len(users._cache) == 1
    # Cached now: a wrong password, another user or a prefix must still fail.
    assert not await users.verify_async("alice", "wrong")
    assert not await users.verify_async("alice", "righ")
    assert not await users.verify_async("alice", "right\0")
    assert not await users.verify_async("bob", "right")
    assert await users.verify_async("alice", "right")
    assert len(users._cache) == 1


async def test_cache_key_does_not_confuse_user_and_password(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "a", "b\0c", cost=4)
    path.write_text(path.read_text() + f"a\0b:{hash_password('other', cost=4)}\n")
    users = HtpasswdFile.load(path)
    assert await users.verify_async("a", "b\0c")
    assert not await users.verify_async("a\0b", "c")


async def test_lone_surrogate_fails_cleanly(tmp_path: Path) -> None:
    path = write(tmp_path, f"alice:{SHA_VECTOR[0]}\nbob:{MD5CRYPT_VECTORS[0][0]}\n")
    users = HtpasswdFile.load(path)
    assert not await users.verify_async("alice", "pass\udcffword")
    assert not users.verify("bob", "\ud800")


async def test_verify_async_cache_skips_bcrypt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "right", cost=4)
    users = HtpasswdFile.load(path)
    calls = 0
    real_check = htpasswd._check

    def counting(entry: htpasswd._Entry, password: str) -> bool:
        nonlocal calls
        calls += 1
        return real_check(entry, password)

    monkeypatch.setattr(htpasswd, "_check", counting)
    results = await asyncio.gather(*(users.verify_async("alice", "right") for _ in range(20)))
    assert all(results)
    assert calls == 1  # concurrent identical checks shared one bcrypt
    assert await users.verify_async("alice", "right")
    assert calls == 1


async def test_verify_async_cache_dropped_on_reload(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "old", cost=4)
    users = HtpasswdFile.load(path)
    assert await users.verify_async("alice", "old")
    set_user(path, "alice", "new", cost=4)
    # Make sure the throttled automatic reload looks at the file now.
    users._next_reload_check = 0.0
    assert not await users.verify_async("alice", "old")
    assert await users.verify_async("alice", "new")


async def test_verify_async_logs_bad_reload_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, f"alice:{SHA_VECTOR[0]}\n")
    users = HtpasswdFile.load(path)
    path.write_text("broken\n")
    caplog.set_level(logging.ERROR, logger="otpd.auth.htpasswd")
    for _ in range(3):
        users._next_reload_check = 0.0
        assert await users.verify_async("alice", "password")
    assert len([r for r in caplog.records if "cannot reload" in r.getMessage()]) == 1


async def test_verify_async_does_not_block_loop(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "pw", cost=10)
    users = HtpasswdFile.load(path)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    start = time.monotonic()
    assert not await users.verify_async("alice", "wrong")
    elapsed = time.monotonic() - start
    task.cancel()
    # The loop kept running while bcrypt worked in a thread.
    assert ticks >= max(1, int(elapsed / 0.005) // 4)


def test_unknown_user_costs_like_a_real_one(tmp_path: Path) -> None:
    path = tmp_path / "users"
    set_user(path, "alice", "pw", cost=8)
    users = HtpasswdFile.load(path)
    users.verify("nobody", "x")  # builds the dummy entry once

    def timed(user: str) -> float:
        start = time.perf_counter()
        for _ in range(3):
            users.verify(user, "wrong")
        return time.perf_counter() - start

    known, unknown = timed("alice"), timed("nobody")
    # Same bcrypt cost, so about equal; a cost-4 dummy would be ~16x faster.
    assert 0.3 < unknown / known < 3.0


def test_new_file_is_not_world_readable(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        set_user(tmp_path / "users", "alice", "pw", cost=4)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "users").stat().st_mode) & 0o007 == 0


def test_a_reader_of_salted_hashes_refuses_sha_entries_also_after_reload(
        tmp_path: Path) -> None:
    apr1 = MD5CRYPT_VECTORS[0]
    path = write(tmp_path, f"alice:{SHA_VECTOR[0]}\nbob:{apr1[0]}\n")
    assert HtpasswdFile.load(path).verify("alice", "password")  # the broker's reading
    users = HtpasswdFile.load(path, accept=htpasswd.SALTED_SCHEMES)  # the REST API's
    assert users.weak_entries == ["alice"]
    assert not users.verify("alice", "password")
    assert users.verify("bob", apr1[1])
    path.write_text(f"carol:{SHA_VECTOR[0]}\n")  # another size: seen as changed
    assert users.reload()
    assert users.weak_entries == ["carol"] and not users.verify("carol", "password")
