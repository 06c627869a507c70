//! Automatic certificates (RFC 8555) for the sites with `tls = { acme = true }`.

use std::path::{Path, PathBuf};

/// Where ACME keeps the certificate and key of `owner` (`app.hello`, `server`).
pub fn cert_files(data_dir: &Path, owner: &str) -> (PathBuf, PathBuf) {
    let dir = data_dir.join("acme").join(owner);
    (dir.join("cert.pem"), dir.join("key.pem"))
}
