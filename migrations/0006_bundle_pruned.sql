-- When retention deleted a deployment's bundle from the store: from then on it cannot be
-- redeployed (nor rolled back to through its bundle), and the dashboard no longer offers it.

ALTER TABLE deployments ADD COLUMN bundle_pruned_at INTEGER;
