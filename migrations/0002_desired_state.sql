-- Desired state: the app's one `live` release is what should run. A release is `deploying` while
-- its containers start and are checked, then `live` (the previous live one `superseded`) or
-- `failed` with the reason. Containers are `starting`, `up` (serving) or `draining` (replaced,
-- finishing their requests before they stop).
ALTER TABLE releases ADD COLUMN status TEXT NOT NULL DEFAULT 'live';
ALTER TABLE releases ADD COLUMN reason TEXT NOT NULL DEFAULT '';
ALTER TABLE releases ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
UPDATE releases SET status = 'superseded'
    WHERE version < (SELECT MAX(version) FROM releases AS r WHERE r.app = releases.app);

ALTER TABLE containers ADD COLUMN state TEXT NOT NULL DEFAULT 'up';
ALTER TABLE containers ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE containers ADD COLUMN last_exit INTEGER;
