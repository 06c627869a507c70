//! nonstop: a release server that turns a `git push` into a zero-downtime blue/green deploy
//! and shows it live. See `docs/DESIGN.md` for the architecture;
//! each module's own doc says what it is for and what it must never do.

pub mod apps;
pub mod aws;
pub mod checks;
pub mod config;
pub mod db;
pub mod domain;
pub mod elapsed;
pub mod events;
pub mod fault;
pub mod gate;
pub mod github_api;
pub mod health;
pub mod listen;
pub mod notify;
pub mod pipeline;
pub mod process;
pub mod queue;
pub mod recovery;
pub mod rollback;
pub mod runner;
pub mod serve;
pub mod store;
pub mod switch;
pub mod traffic;
pub mod version;
pub mod web;
pub mod webhook;
