-- TLS certificates: one per app (PEM chain and key), served on --https for the app's hosts it
-- covers.
CREATE TABLE certs (
    app         TEXT PRIMARY KEY NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    chain       TEXT NOT NULL,
    key         TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
