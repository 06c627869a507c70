-- The "why" log: every trigger nonstop heard — a webhook delivery, a CLI or dashboard action —
-- with what it decided and why, in one line. Never the body of a request. Refusals are kept
-- only up to the newest `MAX_REFUSALS` (anyone can send them); the rest are kept for good.

CREATE TABLE triggers (
    id            INTEGER PRIMARY KEY,
    received_at   INTEGER NOT NULL,
    app           TEXT,                -- NULL when refused before an app was known
    source        TEXT    NOT NULL,    -- github | travis | api (the admin token) | dashboard
    event         TEXT,                -- push, check_run, ping, build; deploy, rollback, lock, …
    delivery_id   TEXT,                -- the sender's id for a webhook delivery
    actor         TEXT    NOT NULL,    -- who: admin, dashboard, github, travis (named users later)
    decision      TEXT    NOT NULL,    -- deployed | waiting | blocked | superseded | ignored | …
    reason        TEXT    NOT NULL,
    status        INTEGER NOT NULL,    -- the HTTP status it was answered with
    deployment_id INTEGER REFERENCES deployments (id)
);
CREATE INDEX triggers_by_app ON triggers (app, id DESC);
CREATE INDEX triggers_by_deployment ON triggers (deployment_id);
CREATE INDEX triggers_refused ON triggers (id) WHERE decision = 'refused';

-- A lock on an app: while it is held, pushes wait (`deployments.held_by_lock`) and manual
-- deploys need `force`; rollbacks still go through. Kept here so a restart keeps it.
CREATE TABLE locks (
    app       TEXT    PRIMARY KEY,
    reason    TEXT    NOT NULL,
    actor     TEXT    NOT NULL,
    locked_at INTEGER NOT NULL
);

-- A `waiting` deployment that waits for the lock (not for CI): `unlock` releases the newest.
ALTER TABLE deployments ADD COLUMN held_by_lock INTEGER NOT NULL DEFAULT 0;
