-- Redeploys and rollbacks reuse a stored bundle; a rollback names the deployment it undoes.
ALTER TABLE deployments ADD COLUMN rollback_of INTEGER REFERENCES deployments (id);
