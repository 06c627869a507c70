//! A real nginx in front of the app, as in the classic recipe: it proxies to whatever the
//! `service-url.inc` beside its config says.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A real nginx on `port`, proxying to whatever `service-url.inc` in `dir` says.
pub struct Nginx {
    pub conf: PathBuf,
}

impl Nginx {
    /// `first_upstream` only makes the config valid before anything is deployed.
    pub fn start(dir: &Path, port: u16, first_upstream: u16) -> Self {
        for sub in ["logs", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let include = dir.join("service-url.inc");
        std::fs::write(
            &include,
            nonstop::switch::nginx::render_include(first_upstream),
        )
        .unwrap();
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir, port)).unwrap();
        let out = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .output()
            .expect("nginx is installed (scripts/test installs it)");
        assert!(
            out.status.success(),
            "nginx did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { conf }
    }
}

fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        r#"daemon on;
pid {d}/nginx.pid;
error_log {d}/logs/error.log;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port};
        include {d}/service-url.inc;
        location / {{
            proxy_pass $service_url;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
        }}
    }}
}}
"#
    )
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("nginx")
            .arg("-c")
            .arg(&self.conf)
            .args(["-s", "stop"])
            .output();
    }
}
