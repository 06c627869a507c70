//! The integration tests, in one binary (`cargo test --test it`), so the crate and the AWS
//! SDK are linked once, not once per file; each file is a module named for what it tests
//! (`deploy::…`, `faults::…`), and the helpers they share are in `common`.

mod common;

mod aws;
mod browser;
mod cancel;
mod checks;
mod cli;
mod console;
mod dashboard;
mod deploy;
mod drain;
mod edge;
mod faults;
mod fleet;
mod guard;
mod hostile;
mod interrupted;
mod metrics;
mod nginx;
mod notify;
mod release;
mod restart;
mod routes;
mod travis;
mod users;
mod webhooks;
