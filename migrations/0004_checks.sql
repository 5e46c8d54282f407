-- The health checks a release's containers must pass (app.json `healthchecks`, JSON).
ALTER TABLE releases ADD COLUMN checks TEXT NOT NULL DEFAULT '{}';
