-- Deployments, their stages and logs, webhook deliveries, and which instance is live.
-- Times are milliseconds since the Unix epoch, UTC.

CREATE TABLE deployments (
    id             INTEGER PRIMARY KEY,
    app            TEXT    NOT NULL,
    status         TEXT    NOT NULL,
    trigger        TEXT    NOT NULL,
    branch         TEXT    NOT NULL,
    commit_sha     TEXT,
    commit_message TEXT,
    author         TEXT,
    version        TEXT,               -- stamped once Fetch knows the commit
    stamped_at     INTEGER,            -- the second {timestamp} stands for, in ms
    port           INTEGER,            -- where the new version was started
    bundle_key     TEXT,
    bundle_sha256  TEXT,
    error          TEXT,
    created_at     INTEGER NOT NULL,
    started_at     INTEGER,
    finished_at    INTEGER
);
CREATE INDEX deployments_by_app ON deployments (app, id DESC);
CREATE INDEX deployments_by_status ON deployments (status, id DESC);
CREATE INDEX deployments_by_app_status ON deployments (app, status, id DESC);

CREATE TABLE stages (
    deployment_id INTEGER NOT NULL REFERENCES deployments (id),
    position      INTEGER NOT NULL,
    name          TEXT    NOT NULL,
    status        TEXT    NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER,
    log           TEXT    NOT NULL DEFAULT '',
    PRIMARY KEY (deployment_id, position)
);

CREATE TABLE deliveries (
    source        TEXT    NOT NULL,    -- github | travis
    delivery_id   TEXT    NOT NULL,
    deployment_id INTEGER REFERENCES deployments (id),
    received_at   INTEGER NOT NULL,
    PRIMARY KEY (source, delivery_id)
);

-- One row per app and port: the version an instance was started with.
CREATE TABLE instances (
    app           TEXT    NOT NULL,
    port          INTEGER NOT NULL,
    version       TEXT    NOT NULL,
    deployment_id INTEGER,
    started_at    INTEGER NOT NULL,
    PRIMARY KEY (app, port)
);

-- Where each app's traffic goes now; read back at start so a restart keeps the live port.
CREATE TABLE live (
    app           TEXT    PRIMARY KEY,
    port          INTEGER NOT NULL,
    profile       TEXT    NOT NULL,
    version       TEXT,
    deployment_id INTEGER,
    since         INTEGER NOT NULL
);

-- Every traffic switch, for the timeline and for rollback.
CREATE TABLE switches (
    id            INTEGER PRIMARY KEY,
    app           TEXT    NOT NULL,
    from_port     INTEGER,
    to_port       INTEGER NOT NULL,
    deployment_id INTEGER,
    at            INTEGER NOT NULL
);
CREATE INDEX switches_by_deployment ON switches (deployment_id);
