"""Forward-only schema migrations, applied in order at start-up."""

from __future__ import annotations

import sqlite3

# Each entry moves the schema from version i to i+1. Never edit a released step:
# add a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE otp (
        reference  TEXT PRIMARY KEY,
        receiver   TEXT NOT NULL,
        salt       BLOB NOT NULL,
        digest     BLOB NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        attempts   INTEGER NOT NULL DEFAULT 0,
        state      TEXT NOT NULL CHECK (state IN ('active', 'used', 'burned'))
    );
    CREATE INDEX otp_expires ON otp (expires_at);
    CREATE TABLE blocklist (
        receiver   TEXT PRIMARY KEY,
        created_at REAL NOT NULL
    );
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        dedupe_key      TEXT UNIQUE,
        command         TEXT NOT NULL,
        channel         TEXT NOT NULL CHECK (channel IN ('sms', 'email')),
        receiver        TEXT NOT NULL,
        subject         TEXT NOT NULL DEFAULT '',
        sealed          BLOB,
        otp_reference   TEXT,
        state           TEXT NOT NULL
                        CHECK (state IN ('pending', 'sent', 'failed', 'expired')),
        code            TEXT,
        reason          TEXT,
        via             TEXT,
        attempts        INTEGER NOT NULL DEFAULT 0,
        created_at      REAL NOT NULL,
        expires_at      REAL NOT NULL,
        next_attempt_at REAL NOT NULL,
        finished_at     REAL
    );
    CREATE INDEX outbox_pending ON outbox (state) WHERE state = 'pending';
    CREATE INDEX outbox_finished ON outbox (finished_at);
    INSERT INTO meta (key, value) VALUES ('schema', '0');
    """,
    # 2: when a message was last handed to a channel, so a restart can tell a
    # message that may already have gone out (killed mid-send) from one that did not.
    """
    ALTER TABLE outbox ADD COLUMN attempt_started REAL;
    """,
    # 3: sliding-window rate limits (one row per hit, or per distinct member).
    """
    CREATE TABLE rate_events (
        key    TEXT NOT NULL,
        member TEXT NOT NULL,
        at     REAL NOT NULL,
        PRIMARY KEY (key, member)
    );
    CREATE INDEX rate_events_key_at ON rate_events (key, at);
    CREATE INDEX rate_events_at ON rate_events (at);
    """,
    # 4: replay cache of signed broker commands: a pending claim while the command
    # runs, then settled (seen) until the signature window ends.
    """
    CREATE TABLE seen_commands (
        key        TEXT PRIMARY KEY
                   CHECK (length(key) BETWEEN 1 AND 128 AND key NOT GLOB '*[^0-9a-f]*'),
        state      TEXT NOT NULL CHECK (state IN ('pending', 'settled')),
        holder     TEXT NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE INDEX seen_commands_expires ON seen_commands (expires_at);
    """,
    # 5: email receivers compare case-insensitively (lower-cased canonical form):
    # a mailbox blocked in another case stays blocked.
    """
    INSERT OR IGNORE INTO blocklist (receiver, created_at)
        SELECT lower(receiver), created_at FROM blocklist
        WHERE receiver LIKE '%@%' AND receiver <> lower(receiver);
    DELETE FROM blocklist WHERE receiver LIKE '%@%' AND receiver <> lower(receiver);
    """,
    # 6: SMS delivery reports. The outbox's ``state`` still says what the wire
    # answered (sent = handed to the network); ``delivery`` says what the network
    # reported since. Each part sent with a report request is kept, so a report
    # that arrives after a restart still finds its message.
    """
    ALTER TABLE outbox ADD COLUMN delivery TEXT
        CHECK (delivery IN ('sent', 'delivered', 'undeliverable', 'unknown'));
    ALTER TABLE outbox ADD COLUMN delivery_at REAL;
    ALTER TABLE outbox ADD COLUMN delivered_at REAL;
    ALTER TABLE outbox ADD COLUMN reported_at REAL;
    CREATE INDEX outbox_delivery_sent ON outbox (delivery) WHERE delivery = 'sent';
    CREATE INDEX outbox_delivery_at ON outbox (delivery_at);
    CREATE TABLE sms_parts (
        message_id  INTEGER NOT NULL,
        part        INTEGER NOT NULL CHECK (part >= 1),
        parts       INTEGER NOT NULL CHECK (parts >= part),
        modem       TEXT NOT NULL,
        sim         TEXT NOT NULL,
        mr          INTEGER NOT NULL CHECK (mr BETWEEN 0 AND 255),
        receiver    TEXT NOT NULL,
        sent_at     REAL NOT NULL,
        status      TEXT NOT NULL DEFAULT 'sent'
                    CHECK (status IN ('sent', 'trying', 'delivered', 'failed')),
        tp_status   INTEGER,
        reported_at REAL,
        PRIMARY KEY (message_id, part)
    );
    CREATE INDEX sms_parts_match ON sms_parts (sim, mr, sent_at);
    """,
]


class SchemaTooNew(Exception):
    pass


def current_version(conn: sqlite3.Connection) -> int:
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
    ).fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; each step in its own transaction."""
    version = current_version(conn)
    if version > len(MIGRATIONS):
        raise SchemaTooNew(
            f"store.path: database schema {version} is newer than this otpd"
            f" ({len(MIGRATIONS)}); upgrade otpd"
        )
    for target in range(version + 1, len(MIGRATIONS) + 1):
        script = MIGRATIONS[target - 1]
        # executescript commits first; wrap the step so it applies fully or not at all.
        bump = f"UPDATE meta SET value = '{target:d}' WHERE key = 'schema';"  # noqa: S608 (an int)
        conn.executescript(f"BEGIN;\n{script}\n{bump}\nCOMMIT;")
    return len(MIGRATIONS)
