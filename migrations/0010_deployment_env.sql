-- The app's env as each deployment ran with it: a keyed hash per value by name (the key is
-- kept in the data dir, apart from this file), never a value. The next deployment compares
-- with it to record which names were added, changed or removed.

CREATE TABLE deployment_env (
    deployment_id INTEGER PRIMARY KEY REFERENCES deployments(id),
    app TEXT NOT NULL,
    digest TEXT NOT NULL
);
CREATE INDEX deployment_env_by_app ON deployment_env (app, deployment_id);
