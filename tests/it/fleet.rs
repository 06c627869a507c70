//! A fleet host, as the CodeDeploy agent runs nonstop's bundles on it: the test plays the
//! agent (ApplicationStop from the previous revision, DownloadBundle, BeforeInstall, Install
//! into the appspec's destination, AfterInstall, ApplicationStart, ValidateService), each
//! hook's `deploy.sh` with only the agent's env vars, and a real nginx in front switched
//! through its include file, as in the classic recipe. Everything else deploy.sh needs comes
//! from the `nonstop.env` that nonstop bundles.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::nginx::Nginx;
use crate::common::unique_port;
use nonstop::config::Config;
use nonstop::pipeline::bundle::{BundleContents, create};
use nonstop::runner::appspec::{parse, render_app_env, render_for, render_host_env};
use nonstop::runner::local::extract;

/// The example app, built once with cargo as a CI job would.
/// This machine's host name, as deploy.sh's `hostname` says it.
fn this_host() -> String {
    let out = std::process::Command::new("hostname").output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

pub fn build_example(target: &Path) -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/hello/Cargo.toml");
    let out = Command::new("cargo")
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("release/hello")
}

/// The agent's part: the hooks in order, `deploy.sh` run from the unpacked revision with
/// the agent's env vars only. Returns the revision's folder (the next ApplicationStop runs
/// from it).
fn agent_deploys(
    host: &Path,
    bundle: &Path,
    deployment: &str,
    previous: Option<&Path>,
    nginx_conf: &Path,
) -> PathBuf {
    let run_hook = |revision: &Path, event: &str| {
        let out = Command::new(revision.join("deploy.sh"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap())
            .env("LIFECYCLE_EVENT", event)
            .env("DEPLOYMENT_ID", deployment)
            .env("APPLICATION_NAME", "hello")
            .env("DEPLOYMENT_GROUP_NAME", "fleet")
            .env("DEPLOYMENT_GROUP_ID", "dg-fleet")
            // The agent's own credentials: the app must never see them.
            .env("AWS_SECRET_ACCESS_KEY", "agent-s3cret")
            // This host's nginx runs from the test's own config, not /etc/nginx.
            .env("NONSTOP_NGINX_CONF", nginx_conf)
            .current_dir(revision)
            .output()
            .unwrap();
        let output = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{event} failed:\n{output}");
        output.into_owned()
    };
    if let Some(previous) = previous {
        run_hook(previous, "ApplicationStop");
    }
    let revision = host.join("deployment-root").join(deployment);
    extract(bundle, &revision).unwrap();
    run_hook(&revision, "BeforeInstall");
    let spec = parse(&std::fs::read_to_string(revision.join("appspec.yml")).unwrap()).unwrap();
    let destination = Path::new(&spec.files[0].destination);
    std::fs::create_dir_all(destination).unwrap();
    for entry in std::fs::read_dir(&revision).unwrap() {
        let entry = entry.unwrap();
        // The agent replaces the files it installed; a running binary keeps its old inode.
        let target = destination.join(entry.file_name());
        let _ = std::fs::remove_file(&target);
        std::fs::copy(entry.path(), target).unwrap();
    }
    run_hook(&revision, "AfterInstall");
    run_hook(&revision, "ApplicationStart");
    let validated = run_hook(&revision, "ValidateService");
    assert!(validated.contains("nginx now sends traffic"), "{validated}");
    revision
}

/// Stops the instances deploy.sh started (they outlive the hooks on purpose).
struct Instances(PathBuf);

impl Drop for Instances {
    fn drop(&mut self) {
        for entry in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if let Ok(pid) = std::fs::read_to_string(entry.path())
                .unwrap_or_default()
                .trim()
                .parse::<i32>()
            {
                // SAFETY: kill(2) on a pid deploy.sh recorded for this test.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn get(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-fsS", "--max-time", "2", url])
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// nginx applies a reload a few milliseconds after `nginx -s reload` returns.
fn wait_served(url: &str, version: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(url).as_deref() != Some(version) {
        assert!(
            Instant::now() < deadline,
            "{url} serves {:?}, not {version}",
            get(url)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_fleet_host_deploys_blue_green_from_the_bundle_alone() {
    let dir = tempfile::tempdir().unwrap();
    let host = dir.path();
    let (front, ports) = (unique_port(), [unique_port(), unique_port()]);
    // The app's own commands each leave a line: which, what they were told, what the front
    // door served at that moment.
    let marks = host.join("marks.log");
    let mark = |what: &str| {
        format!(
            "echo \"{what} $NONSTOP_STAGE $NONSTOP_VERSION idle=$NONSTOP_IDLE_PORT mode=$APP_MODE served=$(curl -fs http://127.0.0.1:{front}/)\" >> {}",
            marks.display()
        )
    };
    let destination = host.join("opt/hello");
    let config = Config::parse(
        &format!(
            r#"
[[app]]
name = "hello"
repo = "x"
build = "cargo build --release"
artifact = "target/release/hello app"
run = "sh -c 'env > {host}/instance-$0.env; exec \"$@\"' {{port}} {{artifact}} --port {{port}} --profile {{profile}}"
ports = [{a}, {b}]
env = {{ APP_MODE = "production" }}
env_file = "{host}/etc/hello.env"
health = {{ path = "/profile", attempts = 40, interval_ms = 100 }}
store = {{ kind = "s3", bucket = "releases" }}
runner = {{ kind = "codedeploy", application = "hello", group = "fleet", destination = "{destination}", nginx_include = "{include}", profile_url = "http://127.0.0.1:{front}/profile", release_host = "{this_host}" }}
release = '{release}'
hooks = {{ before_switch = '{before}', after_switch = '{after}' }}
"#,
            a = ports[0],
            b = ports[1],
            destination = destination.display(),
            host = host.display(),
            include = host.join("nginx/service-url.inc").display(),
            this_host = this_host(),
            release = mark("release"),
            before = mark("before"),
            after = mark("after"),
        ),
        Path::new("nonstop.toml"),
    )
    .unwrap();
    let app = &config.apps[0];
    // The second deployment names another host for the release: this one skips it.
    let mut elsewhere = app.clone();
    if let nonstop::config::RunnerConfig::CodeDeploy { release_host, .. } = &mut elsewhere.runner {
        *release_host = Some("another-host".into());
    }
    // The host keeps the app's secrets in its own env file; bundles never carry them.
    std::fs::create_dir_all(host.join("etc")).unwrap();
    std::fs::write(
        host.join("etc/hello.env"),
        "DATABASE_URL=postgres://host-s3cret\n",
    )
    .unwrap();
    // A file name with a space: the run line must take the path as one word.
    let artifact = host.join("target/release/hello app");
    std::fs::copy(build_example(&host.join("target")), &artifact).unwrap();
    // Nothing listens on the second port yet: nginx answers 502, so the first slot is idle.
    let nginx = Nginx::start(&host.join("nginx"), front, ports[1]);
    let _instances = Instances(destination.join("run"));
    let front_url = format!("http://127.0.0.1:{front}/");

    let mut previous: Option<PathBuf> = None;
    for (n, version) in [
        "1.0.1-SNAPSHOT-20261125090000",
        "1.0.1-SNAPSHOT-20261125090100",
    ]
    .into_iter()
    .enumerate()
    {
        let bundle = host.join(format!("bundle-{n}.zip"));
        let app = if n == 0 { app } else { &elsewhere };
        create(
            &BundleContents {
                appspec: &render_for(app),
                host_env: &render_host_env(app),
                app_env: &render_app_env(app),
                artifact: &artifact,
                version,
            },
            &bundle,
        )
        .unwrap();
        let revision = agent_deploys(
            host,
            &bundle,
            &format!("d-{n}"),
            previous.as_deref(),
            &nginx.conf,
        );
        wait_served(&front_url, version);
        previous = Some(revision);
    }

    let [v1, v2] = [
        "1.0.1-SNAPSHOT-20261125090000",
        "1.0.1-SNAPSHOT-20261125090100",
    ];
    let text = std::fs::read_to_string(&marks).unwrap();
    let [a, b] = ports;
    assert_eq!(
        text.lines()
            .map(|line| match line.split_once(" served=") {
                Some((head, _)) if line.starts_with("after ") => head.to_owned(),
                _ => line.to_owned(),
            })
            .collect::<Vec<_>>(),
        [
            // The first deployment: nothing served yet (nginx answers 502 with its own page).
            format!("release Release {v1} idle={a} mode=production served="),
            format!("before BeforeSwitch {v1} idle={a} mode=production served="),
            // (nginx's reload takes effect a moment after it returns: what it served then is
            // not checked after the switch.)
            format!("after AfterSwitch {v1} idle={a} mode=production"),
            // The second: its release runs on another host; the hooks run here, around the
            // switch.
            format!("before BeforeSwitch {v2} idle={b} mode=production served={v1}"),
            format!("after AfterSwitch {v2} idle={b} mode=production"),
        ],
        "{text}"
    );

    // Blue/green on the host: the second version took the other port, nginx points there,
    // and the first keeps running for an instant rollback.
    assert_eq!(
        std::fs::read_to_string(host.join("nginx/service-url.inc")).unwrap(),
        nonstop::switch::nginx::render_include(ports[1])
    );
    assert_eq!(
        get(&format!("http://127.0.0.1:{}/profile", ports[1])).as_deref(),
        Some("real2")
    );
    assert_eq!(
        get(&format!("http://127.0.0.1:{}/", ports[0])).as_deref(),
        Some("1.0.1-SNAPSHOT-20261125090000")
    );
    for port in ports {
        assert!(
            destination.join(format!("run/{port}.pid")).exists(),
            "no pid file for {port}"
        );
        // The instance got the bundle's env and the host's secrets, and nothing of the
        // agent's but what deploy.sh passes on.
        let dump = std::fs::read_to_string(host.join(format!("instance-{port}.env"))).unwrap();
        for line in [
            "APP_MODE=production",
            "DATABASE_URL=postgres://host-s3cret",
            "DEPLOYMENT_GROUP_NAME=fleet",
        ] {
            assert!(dump.lines().any(|l| l == line), "{line} not in {dump}");
        }
        assert!(
            !dump.contains("AWS_") && !dump.contains("agent-s3cret"),
            "{dump}"
        );
    }
}

#[test]
fn deploy_sh_and_the_scripts_pass_shellcheck() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("shellcheck")
        .args(["deploy.sh", "scripts/test", "scripts/bench", ".ci/run"])
        .current_dir(root)
        .output()
        .expect("shellcheck is installed (scripts/test installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
