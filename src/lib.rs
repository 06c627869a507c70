//! nonstop: a release server that turns a `git push` into a zero-downtime blue/green deploy
//! and shows it live. See `docs/DESIGN.md` for the architecture;
//! each module's own doc says what it is for and what it must never do.
//!
//! The public modules are what the binary, the integration tests and the benchmarks drive
//! (start-up, config, the router, the backends tested against moto and nginx); the rest is
//! the crate's own, so the compiler reports what nothing uses.

pub mod app_env;
pub mod aws;
pub mod cli;
pub mod config;
pub mod domain;
pub mod pipeline;
pub mod process;
pub mod runner;
pub mod serve;
pub mod store;
pub mod switch;
pub mod user;
pub mod web;
pub mod webhook;

pub(crate) mod apps;
pub(crate) mod checks;
pub(crate) mod db;
pub(crate) mod elapsed;
pub(crate) mod events;
pub(crate) mod fault;
pub(crate) mod gate;
pub(crate) mod github_api;
pub(crate) mod health;
pub(crate) mod listen;
pub(crate) mod notify;
pub(crate) mod output;
pub(crate) mod queue;
pub(crate) mod recovery;
pub(crate) mod rollback;
pub(crate) mod traffic;
pub(crate) mod version;
