-- The GitHub Deployment made for a nonstop deployment, from its creation until its last
-- status: kept here so that a deployment cut short by a stop still gets its final status
-- (failure) after the restart.

CREATE TABLE github_deployments (
    deployment_id INTEGER PRIMARY KEY REFERENCES deployments (id),
    github_id     INTEGER NOT NULL
);
