-- Which host uid/gid range each app's containers map their user namespace to: the n-th
-- (`slot`) range berth handed out (deploy turns it into host ids). AUTOINCREMENT: a slot is
-- never handed out again, not even after its app was destroyed.
CREATE TABLE user_ranges (
    slot  INTEGER PRIMARY KEY AUTOINCREMENT,
    app   TEXT NOT NULL UNIQUE REFERENCES apps(name) ON DELETE CASCADE
);
