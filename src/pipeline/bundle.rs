//! Bundle: the zip a runner deploys — `appspec.yml`, `deploy.sh` and its `nonstop.env`, the
//! app's non-secret `app.env`, the artifact and `VERSION` — with its sha256. It never holds
//! a secret. The same bundle serves the local runner and
//! CodeDeploy.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::store::sha256_file;

/// The one host script, compiled in so every bundle carries the server's own copy.
pub const DEPLOY_SH: &str = include_str!("../../deploy.sh");

pub struct BundleContents<'a> {
    pub appspec: &'a str,
    /// `nonstop.env`: deploy.sh's settings on fleet hosts.
    pub host_env: &'a str,
    /// `app.env`: the app's own `env` table, for the instance on fleet hosts.
    pub app_env: &'a str,
    pub artifact: &'a Path,
    pub version: &'a str,
}

/// What writing a bundle can fail with, naming the file it was writing or reading.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {}", path.display(), zip_reason(source))]
    Zip {
        path: PathBuf,
        source: zip::result::ZipError,
    },
    #[error("{} has no file name", .0.display())]
    NoFileName(PathBuf),
    #[error("bundle task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The zip crate's i/o error says only "i/o error": the reason (a full disk, say) is inside.
fn zip_reason(err: &zip::result::ZipError) -> String {
    match err {
        zip::result::ZipError::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

/// A bundle written: its sha256 and a short listing for the stage log.
#[derive(Debug)]
pub struct Bundled {
    pub sha256: String,
    pub listing: String,
}

/// Writes the bundle to `dest`.
pub fn create(contents: &BundleContents<'_>, dest: &Path) -> Result<Bundled, BundleError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BundleError::Io { path, source }
    };
    let zip_error = |source| BundleError::Zip {
        path: dest.to_owned(),
        source,
    };
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(io(dest))?;
    }
    let file = std::fs::File::create(dest).map_err(io(dest))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let text = zip::write::SimpleFileOptions::default().unix_permissions(0o644);
    let executable = zip::write::SimpleFileOptions::default().unix_permissions(0o755);
    let artifact_name = contents
        .artifact
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BundleError::NoFileName(contents.artifact.to_owned()))?;

    let mut add = |name: &str, options, data: &mut dyn std::io::Read| -> Result<u64, BundleError> {
        zip.start_file(name, options).map_err(zip_error)?;
        std::io::copy(data, &mut zip).map_err(io(dest))
    };
    let mut listing = String::new();
    for (name, options, data) in [
        ("appspec.yml", text, contents.appspec.as_bytes()),
        ("deploy.sh", executable, DEPLOY_SH.as_bytes()),
        ("nonstop.env", text, contents.host_env.as_bytes()),
        ("app.env", text, contents.app_env.as_bytes()),
        (
            "VERSION",
            text,
            format!("{}\n", contents.version).as_bytes(),
        ),
    ] {
        let size = add(name, options, &mut &data[..])?;
        listing.push_str(&format!("{name} ({size} bytes)\n"));
    }
    let mut artifact = std::fs::File::open(contents.artifact).map_err(io(contents.artifact))?;
    let size = add(artifact_name, executable, &mut artifact)?;
    listing.push_str(&format!("{artifact_name} ({size} bytes)\n"));
    let mut out = zip.finish().map_err(zip_error)?;
    out.flush().map_err(io(dest))?;
    let sha256 = sha256_file(dest).map_err(io(dest))?;
    Ok(Bundled { sha256, listing })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_holds_appspec_script_artifact_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let artifact = dir.path().join("hello");
        std::fs::write(&artifact, b"binary").unwrap();
        let dest = dir.path().join("out/bundle.zip");
        let contents = BundleContents {
            appspec: "version: 0.0\n",
            host_env: "NONSTOP_PORTS=8081 8082\n",
            app_env: "APP_MODE=production\n",
            artifact: &artifact,
            version: "1.0.1-SNAPSHOT-20261125140000",
        };
        let bundled = create(&contents, &dest).unwrap();
        assert_eq!(bundled.sha256, sha256_file(&dest).unwrap());
        assert!(
            bundled.listing.contains("hello (6 bytes)"),
            "{}",
            bundled.listing
        );

        let mut zip = zip::ZipArchive::new(std::fs::File::open(&dest).unwrap()).unwrap();
        let mut names: Vec<_> = zip.file_names().map(str::to_owned).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "VERSION",
                "app.env",
                "appspec.yml",
                "deploy.sh",
                "hello",
                "nonstop.env"
            ]
        );
        assert_eq!(
            zip.by_name("deploy.sh").unwrap().unix_mode().unwrap() & 0o777,
            0o755
        );
        let mut version = String::new();
        std::io::Read::read_to_string(&mut zip.by_name("VERSION").unwrap(), &mut version).unwrap();
        assert_eq!(version, "1.0.1-SNAPSHOT-20261125140000\n");
    }
}
