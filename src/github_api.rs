//! GitHub's REST API client, set up in one place from `[github]`: the token and the API root
//! (GitHub Enterprise Server's is `https://HOST/api/v3`). Everything that talks to GitHub
//! builds its client here: deployment statuses (`notify::github`) and the checks gate's
//! questions (`checks`). The token goes into the client's auth header and nowhere else:
//! never into a log line, an error's text or a URL.

use octocrab::Octocrab;

use crate::config::GitHubConfig;

#[derive(Debug, thiserror::Error)]
pub enum GitHubApiError {
    #[error("github.token_env was not read at start")]
    NoToken,
    /// octocrab refused the API root; the config check already made it an http(s) URL.
    #[error("github.api_url: {0}")]
    ApiUrl(String),
}

/// A client for `config`'s API root, authenticated with its token.
pub fn client(config: &GitHubConfig) -> Result<Octocrab, GitHubApiError> {
    let token = config.token.as_ref().ok_or(GitHubApiError::NoToken)?;
    Octocrab::builder()
        .base_uri(config.api_url.as_str())
        .and_then(|builder| builder.personal_token(token.expose().to_owned()).build())
        .map_err(|err| GitHubApiError::ApiUrl(err.to_string()))
}

/// What went wrong with a request, in one line for a log: GitHub's status and message, or
/// why no answer came. Neither holds the token.
pub fn describe(err: &octocrab::Error) -> String {
    match err {
        octocrab::Error::GitHub { source, .. } => format!(
            "GitHub answered {}: {}",
            source.status_code.as_u16(),
            source.message
        ),
        other => format!("GitHub request failed: {other}"),
    }
}
