-- Apps with automatic certificates (`certs:auto`): berth orders one by ACME HTTP-01 for all the
-- app's hosts and renews it before expiry. The certificate itself is in `certs`; last_error is
-- why the last order failed (NULL after a success).
CREATE TABLE acme (
    app             TEXT PRIMARY KEY NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    redirect_https  INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    enabled_at      TEXT NOT NULL
);
