-- The guard window after a deployment switched traffic: while `outcome` is NULL its new
-- version is watched, and a restart resumes the watch until `ends_at`.
CREATE TABLE guards (
    deployment_id INTEGER PRIMARY KEY REFERENCES deployments (id),
    app           TEXT    NOT NULL,
    from_port     INTEGER NOT NULL,   -- the previous instance, still running, to switch back to
    to_port       INTEGER NOT NULL,
    version       TEXT    NOT NULL,   -- the guarded version, as the proxy counts it
    started_at    INTEGER NOT NULL,
    ends_at       INTEGER NOT NULL,
    outcome       TEXT,               -- passed | tripped | ended
    reason        TEXT,
    finished_at   INTEGER,
    chart         TEXT                -- JSON: both versions' traffic around the switch, as it was at the end
);
CREATE INDEX guards_open ON guards (app) WHERE outcome IS NULL;
