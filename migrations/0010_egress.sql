-- Whether the app's containers may open connections out of berth's bridge (`network:set`).
ALTER TABLE apps ADD COLUMN egress INTEGER NOT NULL DEFAULT 1;
