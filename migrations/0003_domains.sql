-- Custom domains: each host belongs to at most one app.
CREATE TABLE domains (
    host        TEXT PRIMARY KEY NOT NULL,
    app         TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    created_at  TEXT NOT NULL
);
