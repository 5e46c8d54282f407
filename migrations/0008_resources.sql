-- What `resources:set` changed of a process type's limits; NULL keeps berth's default.
CREATE TABLE resources (
    app           TEXT NOT NULL REFERENCES apps(name) ON DELETE CASCADE,
    process_type  TEXT NOT NULL,
    memory        INTEGER,
    cpu_millis    INTEGER,
    pids          INTEGER,
    PRIMARY KEY (app, process_type)
);
-- Whether the crashed container a dyno replaced was killed for running out of memory.
ALTER TABLE containers ADD COLUMN last_exit_oom INTEGER NOT NULL DEFAULT 0;
