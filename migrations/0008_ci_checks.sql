-- The checks gate (`trigger = "checks"`): the latest report of each check run and commit
-- status GitHub sent about a waiting commit, one row per check (a re-run, with a higher
-- GitHub id, replaces its row). Rows live only while their commit waits.
-- A deployment keeps what it waits for, and the check(s) that let it through or failed it.

CREATE TABLE ci_checks (
    app         TEXT    NOT NULL,
    commit_sha  TEXT    NOT NULL,
    kind        TEXT    NOT NULL,   -- check_run | status
    name        TEXT    NOT NULL,   -- the check run's name, or the status's context
    github_id   INTEGER NOT NULL,
    state       TEXT    NOT NULL,   -- pending | passed | failed
    word        TEXT    NOT NULL,   -- GitHub's own: in_progress, success, timed_out, error, …
    url         TEXT,
    reported_at INTEGER NOT NULL,
    PRIMARY KEY (app, commit_sha, kind, name)
);

ALTER TABLE deployments ADD COLUMN ci_check       TEXT;
ALTER TABLE deployments ADD COLUMN ci_waiting_for TEXT;
