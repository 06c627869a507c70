//! The `nonstop` command: `serve` runs the server; `deploy`, `rollback`, `lock`, `unlock` and
//! `status` talk to a running one through its HTTP API.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use nonstop::config::Config;
use nonstop::serve;

#[derive(Parser)]
#[command(
    name = "nonstop",
    version,
    about = "Zero-downtime blue/green releases from a git push"
)]
struct Cli {
    /// The config file.
    #[arg(
        long,
        short,
        global = true,
        default_value = "nonstop.toml",
        env = "NONSTOP_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: webhooks, pipeline, proxies, dashboard.
    Serve,
    /// Run the built-in proxies in a process of their own (set `server.proxy_socket`), so
    /// that restarting `serve` drops no connection.
    Proxy,
    /// Queue a deployment of APP (the branch head, or --commit) on the running server.
    Deploy {
        app: String,
        #[arg(long)]
        commit: Option<String>,
        /// Deploy even though APP is locked.
        #[arg(long)]
        force: bool,
    },
    /// Lock APP: pushes wait (recorded `waiting`) and deploys need --force until `unlock`.
    /// Rollbacks still go through.
    Lock {
        app: String,
        /// Why, shown with every push that waits and on the dashboard.
        #[arg(long)]
        reason: String,
    },
    /// Unlock APP and deploy the newest push that waited for it.
    Unlock { app: String },
    /// Undo APP's live deployment on the running server: switch back to the previous
    /// instance while it runs, else redeploy the previous version's bundle.
    Rollback { app: String },
    /// Show what is live and the last deployments.
    Status { app: Option<String> },
}

#[tokio::main]
async fn main() {
    if let Err(err) = run(Cli::parse()).await {
        eprintln!("nonstop: {err:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let load = match cli.command {
        Command::Serve => Config::load,
        Command::Proxy => Config::load_settings,
        Command::Deploy { .. }
        | Command::Rollback { .. }
        | Command::Lock { .. }
        | Command::Unlock { .. }
        | Command::Status { .. } => Config::load_settings,
    };
    let config = load(&cli.config).map_err(|err| anyhow::anyhow!("{err}"))?;
    match cli.command {
        Command::Serve => {
            let shutdown = start_logging_and_signals();
            serve::serve(config, shutdown).await?;
            Ok(())
        }
        Command::Proxy => {
            let shutdown = start_logging_and_signals();
            serve::run_proxies(config, shutdown).await?;
            Ok(())
        }
        Command::Deploy { app, commit, force } => {
            let body = serde_json::json!({ "commit": commit, "force": force });
            let id = post_action(&config, &format!("/api/apps/{app}/deploy"), &body).await?;
            println!(
                "deployment {id} queued for {app}: {}/deployments/{id}",
                server_url(&config)
            );
            Ok(())
        }
        Command::Rollback { app } => {
            let body = serde_json::json!({});
            let id = post_action(&config, &format!("/api/apps/{app}/rollback"), &body).await?;
            println!(
                "rollback of {app}: deployment {id}, {}/deployments/{id}",
                server_url(&config)
            );
            Ok(())
        }
        Command::Lock { app, reason } => {
            let body = serde_json::json!({ "reason": reason });
            post_json(&config, &format!("/api/apps/{app}/lock"), &body).await?;
            println!(
                "{app} is locked: pushes wait and deploys need --force until `nonstop unlock {app}`"
            );
            Ok(())
        }
        Command::Unlock { app } => {
            let body = serde_json::json!({});
            let answer = post_json(&config, &format!("/api/apps/{app}/unlock"), &body).await?;
            match answer["deployment_id"].as_i64() {
                Some(id) => println!(
                    "{app} is unlocked; the newest waiting push is deployment {id}: {}/deployments/{id}",
                    server_url(&config)
                ),
                None => println!("{app} is unlocked; no push was waiting"),
            }
            Ok(())
        }
        Command::Status { app } => status(&config, app.as_deref()).await,
    }
}

/// For the long-running commands: logs to stderr (`RUST_LOG`, default info) and a token
/// cancelled on SIGTERM or SIGINT.
fn start_logging_and_signals() -> CancellationToken {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // stdout is for what a command answers: `serve` and `proxy` print their bound addresses.
        .with_writer(std::io::stderr)
        .init();
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    shutdown
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("stopping");
    shutdown.cancel();
}

fn server_url(config: &Config) -> String {
    format!("http://{}", config.server.listen)
}

fn admin_token(config: &Config) -> Result<String> {
    if let Ok(token) = std::env::var(&config.server.admin_token_env)
        && !token.is_empty()
    {
        return Ok(token);
    }
    let path = serve::admin_token_file(&config.data_dir());
    read_token(&path).with_context(|| {
        format!(
            "no admin token: set {} or start `nonstop serve` once so it writes {}",
            config.server.admin_token_env,
            path.display()
        )
    })
}

fn read_token(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// POSTs an action to the running server with the admin token; returns the deployment id
/// it answers, or the server's one-line reason as the error.
async fn post_action(
    config: &Config,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    Ok(post_json(config, path, body).await?["deployment_id"].clone())
}

/// POSTs an action to the running server with the admin token; returns its JSON answer, or
/// the server's one-line reason as the error.
async fn post_json(
    config: &Config,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    let token = admin_token(config)?;
    let url = format!("{}{path}", server_url(config));
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the server at {url}: is `nonstop serve` running?")
        })?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if !status.is_success() {
        bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(body)
}

/// GETs `path` from the running server with the admin token (reads need it unless
/// `server.public_read` is on); returns the JSON answer, or the server's one-line reason.
async fn get_json<T: serde::de::DeserializeOwned>(config: &Config, path: &str) -> Result<T> {
    let token = admin_token(config)?;
    let url = format!("{}{path}", server_url(config));
    let response = reqwest::Client::new()
        .get(&url)
        .bearer_auth(token)
        .send()
        .await
        .with_context(|| {
            format!("cannot reach the server at {url}: is `nonstop serve` running?")
        })?;
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        bail!(
            "{status}: {}",
            body["error"].as_str().unwrap_or("no reason given")
        );
    }
    response
        .json()
        .await
        .with_context(|| format!("{url} did not answer the JSON nonstop sends"))
}

async fn status(config: &Config, app: Option<&str>) -> Result<()> {
    let apps: Vec<serde_json::Value> = get_json(config, "/api/apps").await?;
    for entry in apps
        .iter()
        .filter(|a| app.is_none_or(|name| a["name"] == name))
    {
        let lock = &entry["lock"];
        if !lock.is_null() {
            println!(
                "{}  locked by {}: {}",
                entry["name"].as_str().unwrap_or("?"),
                lock["actor"].as_str().unwrap_or("?"),
                lock["reason"].as_str().unwrap_or("?"),
            );
        }
        let live = &entry["live"];
        if live.is_null() {
            println!(
                "{}  nothing live yet ({})",
                entry["name"].as_str().unwrap_or("?"),
                entry["entry"].as_str().unwrap_or("?")
            );
        } else {
            println!(
                "{}  live on {} ({}) version {} — {}",
                entry["name"].as_str().unwrap_or("?"),
                live["port"],
                live["profile"].as_str().unwrap_or("?"),
                live["version"].as_str().unwrap_or("?"),
                entry["entry"].as_str().unwrap_or("?"),
            );
        }
    }
    let mut path = "/api/deployments?limit=10".to_owned();
    if let Some(app) = app {
        let app: String = url::form_urlencoded::byte_serialize(app.as_bytes()).collect();
        path.push_str(&format!("&app={app}"));
    }
    let deployments: Vec<serde_json::Value> = get_json(config, &path).await?;
    for d in deployments {
        println!(
            "  #{:<5} {:<12} {:<11} {}",
            d["id"],
            d["app"].as_str().unwrap_or(""),
            d["status"].as_str().unwrap_or(""),
            d["version"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}
