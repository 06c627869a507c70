//! What capturing a build's output costs. `cargo bench --bench capture` runs
//! `yes | head -n 600000` (600,000 two-byte lines) three ways and prints the median of a few
//! runs of each, wall time and this process's own CPU (the server's share; the child's is
//! not counted):
//! - the command alone, its output read and thrown away by a plain blocking reader;
//! - `process::run`, the capture every git, build and hook command goes through;
//! - the Build stage's work (`pipeline::build::run`: the command, the capture, the artifact).
//!
//! Issue 11 asked the Build stage to take at most twice the command's own time. Also prints
//! the size of the log kept, which is bounded whatever the command prints.

use std::io::Read;
use std::path::Path;
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use tokio::process::Command;

const SCRIPT: &str = "yes | head -n 600000";
const RUNS: usize = 7;

/// This process's CPU time so far (user + system), children excluded.
fn own_cpu() -> Duration {
    // SAFETY: getrusage only writes into the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

struct Sample {
    wall: Duration,
    cpu: Duration,
    log_bytes: usize,
}

fn median(mut samples: Vec<Sample>) -> Sample {
    samples.sort_by_key(|s| s.wall);
    samples.swap_remove(samples.len() / 2)
}

async fn measure<F, Fut>(mut once: F) -> Sample
where
    F: FnMut() -> Fut,
    Fut: Future<Output = usize>,
{
    let mut samples = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let (started, cpu) = (Instant::now(), own_cpu());
        let log_bytes = once().await;
        samples.push(Sample {
            wall: started.elapsed(),
            cpu: own_cpu() - cpu,
            log_bytes,
        });
    }
    median(samples)
}

fn alone() -> usize {
    let mut child = StdCommand::new("sh")
        .arg("-c")
        .arg(SCRIPT)
        .stdout(Stdio::piped())
        .spawn()
        .expect("sh starts");
    let mut out = child.stdout.take().expect("piped stdout");
    let mut buf = vec![0; 64 * 1024];
    let mut read = 0;
    loop {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    assert!(child.wait().expect("sh ends").success());
    assert_eq!(read, 1_200_000, "yes | head printed something else");
    0
}

fn sh(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script);
    command
}

fn app(dir: &Path) -> nonstop::config::AppConfig {
    let text = format!(
        "[[app]]\nname = \"bench\"\nrepo = \"unused\"\nbuild = \"{SCRIPT} && touch artifact\"\n\
         artifact = \"artifact\"\nrun = \"{{artifact}} --port {{port}}\"\n"
    );
    nonstop::config::Config::parse(&text, &dir.join("nonstop.toml"))
        .expect("a valid config")
        .apps
        .remove(0)
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let app = app(dir.path());

    let command = measure(|| async { tokio::task::block_in_place(alone) }).await;
    let capture = measure(|| async {
        let done = nonstop::process::run(sh(SCRIPT), Duration::from_secs(120))
            .await
            .expect("sh starts");
        assert!(done.success, "{}", done.status);
        done.log.len()
    })
    .await;
    let build = measure(|| async {
        let input = nonstop::pipeline::build::BuildInput {
            app: &app,
            checkout: dir.path(),
            version: "1.0.0",
            commit: "0000000000000000000000000000000000000000",
            branch: "main",
            env: &nonstop::app_env::AppEnv::default(),
            env_change: None,
        };
        // What the pipeline does: every line also goes to a console.
        let built = nonstop::pipeline::build::run(input, &mut nonstop::process::Discard).await;
        match built {
            Ok(done) => done.log.len(),
            Err(failed) => panic!("the build failed: {}\n{}", failed.error, failed.log),
        }
    })
    .await;

    println!("`{SCRIPT}`, median of {RUNS} runs");
    println!(
        "{:<34} {:>10} {:>14} {:>10}",
        "", "wall", "nonstop CPU", "log kept"
    );
    for (name, sample) in [
        ("the command alone", &command),
        ("process::run (capture)", &capture),
        ("Build stage (build::run)", &build),
    ] {
        println!(
            "{name:<34} {:>7.1} ms {:>11.1} ms {:>7} KiB",
            sample.wall.as_secs_f64() * 1000.0,
            sample.cpu.as_secs_f64() * 1000.0,
            sample.log_bytes / 1024
        );
    }
    println!(
        "Build stage / command: {:.2}×",
        build.wall.as_secs_f64() / command.wall.as_secs_f64()
    );
}
