-- The CI build (Travis) that let a deployment through, or that failed it: its number and
-- page, shown with the deployment. A push to an app with `trigger = "travis"` is recorded
-- with status 'waiting' until its build reports; the index finds that row by commit.

ALTER TABLE deployments ADD COLUMN ci_build_number TEXT;
ALTER TABLE deployments ADD COLUMN ci_build_url    TEXT;
CREATE INDEX deployments_by_app_commit ON deployments (app, commit_sha, id DESC);
