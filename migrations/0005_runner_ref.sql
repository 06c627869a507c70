-- What the runner calls a deployment elsewhere: the AWS CodeDeploy deployment id. Kept as
-- soon as it is known, so that after a stop nonstop can still ask AWS to stop a fleet
-- deployment it no longer follows.

ALTER TABLE deployments ADD COLUMN runner_ref TEXT;
