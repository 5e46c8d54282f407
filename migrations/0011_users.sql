-- Users: keys and API tokens belong to one; an admin may do anything, any other user only
-- what concerns the apps granted to them (`apps:grant`). `admin` is root on the server and
-- owns the keys added before users existed.
CREATE TABLE users (
    name           TEXT PRIMARY KEY NOT NULL,
    admin          INTEGER NOT NULL DEFAULT 0,
    password_hash  TEXT,               -- argon2 PHC string; NULL: no dashboard login
    created_at     TEXT NOT NULL
);
INSERT INTO users (name, admin, created_at) VALUES ('admin', 1, strftime('%Y-%m-%dT%H:%M:%SZ', 'now'));

CREATE TABLE grants (
    app         TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    user        TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (app, user)
);

-- API tokens: only the SHA-256 of each is kept (they are 256 random bits, shown once).
CREATE TABLE tokens (
    user          TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    name          TEXT NOT NULL,
    hash          TEXT NOT NULL UNIQUE,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT,
    PRIMARY KEY (user, name)
);

-- (SQLite cannot add a column with a REFERENCES clause and a default: removing a user removes
-- its keys in the store.)
ALTER TABLE keys ADD COLUMN user TEXT NOT NULL DEFAULT 'admin';
