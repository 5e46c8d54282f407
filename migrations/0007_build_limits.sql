-- What `builds:set` changed of an app's build limits; NULL keeps berth's default.
CREATE TABLE build_limits (
    app           TEXT PRIMARY KEY NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    memory        INTEGER,
    cpu_millis    INTEGER,
    pids          INTEGER,
    timeout_secs  INTEGER
);
