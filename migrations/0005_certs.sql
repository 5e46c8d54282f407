-- TLS certificates: one per app (PEM chain and key), served on --https for the app's hosts it
-- covers; with redirect_https, plain-HTTP requests to those hosts are redirected there.
CREATE TABLE certs (
    app         TEXT PRIMARY KEY NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    chain       TEXT NOT NULL,
    key             TEXT NOT NULL,
    redirect_https  INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL
);
