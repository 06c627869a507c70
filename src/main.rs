//! The `nonstop` command: `serve` runs the server; `deploy`, `rollback`, `redeploy`, `lock`,
//! `unlock`, `cancel`, `status`, `history` and `logs` talk to a running one through its HTTP API (the
//! client, and following a deployment to its end, are `nonstop::cli`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use nonstop::cli::follow::Outcome;
use nonstop::cli::{self, Client, FollowOptions};
use nonstop::config::Config;
use nonstop::domain::DeploymentId;
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
    /// Run the built-in proxies in a process of their own, so that restarting `serve` drops
    /// no connection (`serve` starts one itself when none runs, unless
    /// `server.proxy_process = false`).
    Proxy {
        /// Stop the running proxy process instead (its listeners close: the apps are no
        /// longer reachable through it). With `serve` stopped too, nothing of nonstop runs.
        #[arg(long, conflicts_with = "upgrade")]
        stop: bool,
        /// Upgrade the running proxy process in place (as SIGUSR2 to the pid in
        /// `proxy.pid` does): the binary now on disk takes its listening sockets and new
        /// connections; the old one finishes its requests, keeps its WebSockets until they
        /// close or the drain window ends, then exits. No connection is refused.
        #[arg(long)]
        upgrade: bool,
    },
    /// Deploy APP (the branch head, or --commit) on the running server and follow it to its
    /// end: exit 0 when it succeeded, 1 when it did not (the reason is the last line).
    Deploy {
        app: String,
        #[arg(long)]
        commit: Option<String>,
        /// Deploy even though APP is locked.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        follow: FollowArgs,
    },
    /// Deploy again what deployment ID deployed (its bundle), and follow it like `deploy`.
    Redeploy {
        id: i64,
        #[command(flatten)]
        follow: FollowArgs,
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
    /// Stop APP's running deployment at once: its build or hook is killed, what it started
    /// is stopped, traffic it moved goes back. Exit 0 once it is recorded `cancelled`.
    Cancel { app: String },
    /// Undo APP's live deployment on the running server: switch back to the previous
    /// instance while it runs, else redeploy the previous version's bundle. Followed like
    /// `deploy`.
    Rollback {
        app: String,
        #[command(flatten)]
        follow: FollowArgs,
    },
    /// Show what is live and the last deployments.
    Status { app: Option<String> },
    /// List APP's deployments, newest first.
    History {
        app: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Print the output of APP's instance (read from the server's data dir: run this on the
    /// server's host).
    Logs {
        app: String,
        /// Keep printing what the instance writes, until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// Which instance: the one traffic goes to, or the other one.
        #[arg(long, value_enum, default_value_t = Instance::Live)]
        instance: Instance,
        /// How many of the last lines to print first.
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
    },
}

/// How `deploy`, `rollback` and `redeploy` wait for the deployment they start.
#[derive(Args)]
struct FollowArgs {
    /// Return as soon as the deployment is queued, without following it.
    #[arg(long)]
    detach: bool,
    /// Also print each finished stage's log (its last lines).
    #[arg(long, short)]
    verbose: bool,
    /// Stop following after this many seconds (the deployment goes on; exit 1).
    #[arg(long, default_value_t = 3600, value_name = "SECONDS")]
    timeout: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum Instance {
    Live,
    Previous,
}

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit 2 (clap's own); a failed deployment or any other error exits 1.
    match run(Cli::parse()).await {
        Ok(Outcome::Succeeded) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("nonstop: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<Outcome> {
    let load = match cli.command {
        Command::Serve => Config::load,
        Command::Proxy { .. } => Config::load_settings,
        Command::Deploy { .. }
        | Command::Redeploy { .. }
        | Command::Rollback { .. }
        | Command::History { .. }
        | Command::Logs { .. }
        | Command::Lock { .. }
        | Command::Unlock { .. }
        | Command::Cancel { .. }
        | Command::Status { .. } => Config::load_settings,
    };
    let config = load(&cli.config).map_err(|err| anyhow::anyhow!("{err}"))?;
    match cli.command {
        Command::Serve => {
            let shutdown = start_logging_and_signals();
            serve::serve(config, shutdown).await?;
            Ok(Outcome::Succeeded)
        }
        Command::Proxy { upgrade: true, .. } => {
            let socket = config.proxy_socket();
            match nonstop::switch::control::upgrade_process(&socket).await? {
                Some((old, new)) => println!("upgraded the proxy process: pid {old} -> pid {new}"),
                None => bail!("no proxy process runs for {}", socket.display()),
            }
            Ok(Outcome::Succeeded)
        }
        Command::Proxy { stop: true, .. } => {
            let socket = config.proxy_socket();
            match nonstop::switch::control::stop_process(&socket).await? {
                Some(pid) => println!("stopped the proxy process (pid {pid})"),
                None => println!("no proxy process runs for {}", socket.display()),
            }
            Ok(Outcome::Succeeded)
        }
        Command::Proxy { .. } => {
            let shutdown = start_logging_and_signals();
            serve::run_proxies(config, shutdown).await?;
            Ok(Outcome::Succeeded)
        }
        Command::Deploy {
            app,
            commit,
            force,
            follow,
        } => {
            let client = client(&config)?;
            let body = serde_json::json!({ "commit": commit, "force": force });
            let path = format!("/api/apps/{app}/deploy");
            act_and_follow(&client, &app, &path, &body, &follow, |id, url| {
                format!("deployment {id} queued for {app}: {url}")
            })
            .await
        }
        Command::Redeploy { id, follow } => {
            let client = client(&config)?;
            let past: cli::follow::Record =
                client.get_json(&format!("/api/deployments/{id}")).await?;
            let app = past.deployment.app;
            let path = format!("/api/deployments/{id}/redeploy");
            act_and_follow(
                &client,
                &app,
                &path,
                &serde_json::json!({}),
                &follow,
                |new, url| format!("redeploy of #{id} queued as deployment {new} for {app}: {url}"),
            )
            .await
        }
        Command::Rollback { app, follow } => {
            let client = client(&config)?;
            let path = format!("/api/apps/{app}/rollback");
            act_and_follow(
                &client,
                &app,
                &path,
                &serde_json::json!({}),
                &follow,
                |id, url| format!("rollback of {app}: deployment {id}, {url}"),
            )
            .await
        }
        Command::Lock { app, reason } => {
            let body = serde_json::json!({ "reason": reason });
            client(&config)?
                .post_json(&format!("/api/apps/{app}/lock"), &body)
                .await?;
            println!(
                "{app} is locked: pushes wait and deploys need --force until `nonstop unlock {app}`"
            );
            Ok(Outcome::Succeeded)
        }
        Command::Unlock { app } => {
            let body = serde_json::json!({});
            let answer = client(&config)?
                .post_json(&format!("/api/apps/{app}/unlock"), &body)
                .await?;
            match answer["deployment_id"].as_i64() {
                Some(id) => println!(
                    "{app} is unlocked; the newest waiting push is deployment {id}: {}/deployments/{id}",
                    server_url(&config)
                ),
                None => println!("{app} is unlocked; no push was waiting"),
            }
            Ok(Outcome::Succeeded)
        }
        Command::Cancel { app } => cancel(&client(&config)?, &app).await,
        Command::Status { app } => {
            status(&client(&config)?, app.as_deref()).await?;
            Ok(Outcome::Succeeded)
        }
        Command::History { app, limit } => {
            for line in cli::history(&client(&config)?, &app, limit).await? {
                println!("{line}");
            }
            Ok(Outcome::Succeeded)
        }
        Command::Logs {
            app,
            follow,
            instance,
            lines,
        } => {
            let port = instance_port(&client(&config)?, &app, instance).await?;
            let path = cli::logs::instance_log(&config.data_dir(), &app, port);
            cli::logs::show(&path, lines, follow).await?;
            Ok(Outcome::Succeeded)
        }
    }
}

/// Asks the server to cancel `app`'s running deployment and waits (up to two minutes) for
/// its record to end: `cancelled`, or whatever it reached first.
async fn cancel(client: &Client, app: &str) -> Result<Outcome> {
    let answer = client
        .post_json(&format!("/api/apps/{app}/cancel"), &serde_json::json!({}))
        .await?;
    let id = answer["deployment_id"]
        .as_i64()
        .context("the server named no deployment")?;
    println!("cancelling deployment {id} of {app}");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let record: cli::follow::Record =
            client.get_json(&format!("/api/deployments/{id}")).await?;
        let deployment = &record.deployment;
        if deployment.status.is_finished() {
            let reason = deployment.error.as_deref().unwrap_or("no reason recorded");
            println!("deployment {id} {}: {reason}", deployment.status);
            return Ok(match deployment.status {
                nonstop::domain::DeploymentStatus::Cancelled => Outcome::Succeeded,
                _ => Outcome::Failed,
            });
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "deployment {id} is still {} after two minutes",
                deployment.status
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Starts a deployment by POSTing `path`, prints `queued(id, url)`, and unless `--detach`
/// follows it to its end. The event stream is opened first, so no event of it is missed.
async fn act_and_follow(
    client: &Client,
    app: &str,
    path: &str,
    body: &serde_json::Value,
    follow: &FollowArgs,
    queued: impl FnOnce(DeploymentId, String) -> String,
) -> Result<Outcome> {
    let (live_before, events) = if follow.detach {
        (None, None)
    } else {
        // Without the stream, following polls the record: slower, never wrong.
        (client.live_port(app).await?, client.events().await.ok())
    };
    let answer = client.post_json(path, body).await?;
    let id: DeploymentId = serde_json::from_value(answer["deployment_id"].clone())
        .context("the server answered no deployment id")?;
    println!(
        "{}",
        queued(id, format!("{}/deployments/{id}", client.base()))
    );
    if follow.detach {
        return Ok(Outcome::Succeeded);
    }
    let options = FollowOptions {
        verbose: follow.verbose,
        timeout: Duration::from_secs(follow.timeout),
    };
    Ok(cli::follow(client, app, id, live_before, events, &options).await?)
}

/// The port of `instance`: the live one, or the app's other port.
async fn instance_port(client: &Client, app: &str, instance: Instance) -> Result<u16> {
    let Some(live) = client.live_port(app).await? else {
        bail!("`{app}` has no live instance yet");
    };
    match instance {
        Instance::Live => Ok(live),
        Instance::Previous => {
            let apps: Vec<serde_json::Value> = client.get_json("/api/apps").await?;
            let ports = apps
                .iter()
                .find(|a| a["name"] == app)
                .map(|a| a["ports"].clone())
                .unwrap_or_default();
            let ports: [u16; 2] =
                serde_json::from_value(ports).context("the server answered no ports for it")?;
            Ok(if ports[0] == live { ports[1] } else { ports[0] })
        }
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

fn client(config: &Config) -> Result<Client> {
    Ok(Client::new(server_url(config), admin_token(config)?))
}

async fn status(client: &Client, app: Option<&str>) -> Result<()> {
    let apps: Vec<serde_json::Value> = client.get_json("/api/apps").await?;
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
    let deployments: Vec<serde_json::Value> = client.get_json(&path).await?;
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
