-- berth's state. Releases are immutable: a config change, deploy or rollback inserts a new one.
CREATE TABLE apps (
    name        TEXT PRIMARY KEY NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE config (
    app    TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,
    PRIMARY KEY (app, key)
);

CREATE TABLE releases (
    app            TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    version        INTEGER NOT NULL,
    image          TEXT NOT NULL,      -- manifest digest in the image store
    config         TEXT NOT NULL,      -- JSON object: the config snapshot
    process_types  TEXT NOT NULL,      -- JSON object: type -> command
    formation      TEXT NOT NULL,      -- JSON object: type -> count
    description    TEXT NOT NULL,
    created_at     TEXT NOT NULL,
    PRIMARY KEY (app, version)
);

CREATE TABLE keys (
    name         TEXT PRIMARY KEY NOT NULL,
    openssh      TEXT NOT NULL UNIQUE,
    fingerprint  TEXT NOT NULL,
    created_at   TEXT NOT NULL
);

-- Containers the daemon started and has not yet removed.
CREATE TABLE containers (
    id            TEXT PRIMARY KEY NOT NULL,
    app           TEXT NOT NULL,
    release       INTEGER NOT NULL,
    process_type  TEXT NOT NULL,
    number        INTEGER NOT NULL,
    ip            TEXT NOT NULL,
    port          INTEGER NOT NULL,
    created_at    TEXT NOT NULL
);
