//! Domain vocabulary shared by every module: names that can only hold valid values, the
//! stages of a deployment and the states they move through. Pure data, no I/O.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// A value that cannot be one of the names below; the reason is one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidValue {
    #[error("`{0}` is not a valid app name (lowercase letters, digits, - and _, at most 64)")]
    AppName(String),
    #[error("`{0}` is not a 40-hex commit id")]
    CommitSha(String),
}

/// An app's name as configured: lowercase letters, digits, `-` and `_`, at most 64 chars,
/// so it is safe in paths, URLs and log fields.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct AppName(String);

impl AppName {
    pub fn parse(name: &str) -> Result<Self, InvalidValue> {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidValue::AppName(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AppName {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        AppName::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Read as the text it holds; it can only be made through `parse`.
impl std::ops::Deref for AppName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AppName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A full 40-hex git commit id, lowercase.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct CommitSha(String);

impl CommitSha {
    pub fn parse(sha: &str) -> Result<Self, InvalidValue> {
        if sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(sha.to_ascii_lowercase()))
        } else {
            Err(InvalidValue::CommitSha(sha.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn short(&self) -> &str {
        &self.0[..7]
    }
}

/// Read as the text it holds; it can only be made through `parse`.
impl std::ops::Deref for CommitSha {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CommitSha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A deployment's number in the record: sortable, shown as a plain number everywhere
/// (URLs, JSON, messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeploymentId(i64);

impl DeploymentId {
    pub fn new(id: i64) -> Self {
        Self(id)
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for DeploymentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for DeploymentId {
    type Err = std::num::ParseIntError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        text.parse().map(Self)
    }
}

/// The address that stands for one client when counting what it holds: an IPv4 address
/// (also when it arrives as `::ffff:a.b.c.d`), or the /64 an IPv6 host usually holds whole.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// A range of peer addresses, `10.0.0.0/8`, `fd00::/8` or a single `192.0.2.7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    network: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("`{0}` is not an IP address or CIDR range (like 10.0.0.0/8)")]
pub struct BadIpRange(String);

impl std::str::FromStr for IpRange {
    type Err = BadIpRange;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadIpRange(text.to_owned());
        let (address, prefix_len) = match text.split_once('/') {
            Some((address, len)) => (address, Some(len.parse::<u8>().map_err(|_| bad())?)),
            None => (text, None),
        };
        let network = address.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = prefix_len.unwrap_or(max);
        if prefix_len > max {
            return Err(bad());
        }
        Ok(Self {
            network,
            prefix_len,
        })
    }
}

impl IpRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(network) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(network), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(network) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl<'de> Deserialize<'de> for IpRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

/// A request to deploy one commit (or the branch head) of one app.
#[derive(Clone, Debug)]
pub struct Trigger {
    pub app: AppName,
    /// `None`: deploy whatever the branch head is when Fetch runs.
    pub commit: Option<CommitSha>,
    pub branch: String,
    pub kind: TriggerKind,
    /// The webhook delivery, so a redelivery or a replay deploys nothing new.
    pub delivery: Option<Delivery>,
    pub message: Option<String>,
    pub author: Option<String>,
    /// Deploy a bundle already in the store instead of building one (redeploy, rollback).
    pub reuse: Option<Reuse>,
}

/// A webhook delivery as the record remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// `github` or `travis`.
    pub source: &'static str,
    /// The sender's id for it (`X-GitHub-Delivery`, Travis's build and verdict).
    pub id: String,
    /// The sha256 of the signed body: the same body under another id is a replay.
    pub body_sha256: Option<String>,
}

impl Delivery {
    /// The `(source, key)` pairs under which the record remembers this delivery; any one of
    /// them seen before makes it a duplicate.
    pub fn keys(&self) -> Vec<(String, &str)> {
        let mut keys = vec![(self.source.to_owned(), self.id.as_str())];
        if let Some(digest) = &self.body_sha256 {
            keys.push((format!("{}-body", self.source), digest.as_str()));
        }
        keys
    }
}

/// Where a deployment's bundle is in the artifact store, and the sha256 it must have. Shown
/// in the API as `bundle_key` and `bundle_sha256`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BundleRef {
    #[serde(rename = "bundle_key")]
    pub key: String,
    #[serde(rename = "bundle_sha256")]
    pub sha256: String,
}

/// A stored bundle to deploy again, and what it was made from.
#[derive(Clone, Debug)]
pub struct Reuse {
    pub from: DeploymentId,
    pub version: String,
    pub bundle: BundleRef,
    /// Set when this redeploy undoes the deployment that is live now.
    pub rollback_of: Option<DeploymentId>,
}

/// What CI said about a deployment's commit, as shown with the deployment it let through or
/// failed: Travis's build number, or the GitHub checks that decided, and a page to look at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CiBuild {
    pub number: Option<String>,
    /// The check runs or status contexts that passed it, or the one that failed it.
    pub check: Option<String>,
    pub url: Option<String>,
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name { $(#[serde(rename = $text)] $variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum! {
    /// `queued → running → succeeded | failed | rolled_back | superseded | interrupted |
    /// cancelled`; an app with `trigger = "travis"` records a push as `waiting` until CI
    /// passed it.
    DeploymentStatus {
        Waiting => "waiting",
        Queued => "queued",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        RolledBack => "rolled_back",
        Superseded => "superseded",
        Interrupted => "interrupted",
        Cancelled => "cancelled",
    }
}

impl DeploymentStatus {
    pub fn is_finished(self) -> bool {
        !matches!(self, Self::Waiting | Self::Queued | Self::Running)
    }
}

string_enum! {

/// What started a deployment.
    TriggerKind {
        Push => "push",
        Travis => "travis",
        Manual => "manual",
        Rollback => "rollback",
    }
}

string_enum! {
    /// What nonstop decided about a trigger (a webhook delivery, an action), for the why log:
    /// `deployed` (a deployment was queued), `waiting` (for CI), `blocked` (waiting for the
    /// app's lock), `superseded` (replaced by a newer one before it ran), `ignored` (another
    /// event, branch, tag or repository, a duplicate, a commit already live, a ping),
    /// `failed` (CI failed the commit), `refused` (bad signature, malformed, too large,
    /// unknown app, locked, …), the lock actions `locked` and `unlocked`, and `cancelled`
    /// (a running deployment stopped on request).
    Decision {
        Deployed => "deployed",
        Waiting => "waiting",
        Blocked => "blocked",
        Superseded => "superseded",
        Ignored => "ignored",
        Failed => "failed",
        Refused => "refused",
        Locked => "locked",
        Unlocked => "unlocked",
        Cancelled => "cancelled",
    }
}

string_enum! {
    /// `pending → running → succeeded | failed | skipped`.
    StageStatus {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
    }
}

/// The latest word GitHub holds on one check of a commit: a check run (a GitHub Actions
/// job, a checks app) or a commit status (CI that reports the older way).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub kind: CheckKind,
    /// The check run's name or the status's context: what `checks = [...]` names.
    pub name: String,
    /// GitHub's id of the run or status: a re-run, or a newer status of the same context,
    /// has a higher one and replaces it.
    pub github_id: i64,
    pub state: CheckState,
    /// GitHub's own word for it (`in_progress`, `success`, `timed_out`, `error`, …).
    pub word: String,
    /// Its page on GitHub, or the status's target URL.
    pub url: Option<String>,
}

string_enum! {
    /// The two ways CI reports to GitHub.
    CheckKind {
        Run => "check_run",
        Status => "status",
    }
}

string_enum! {
    /// A check's state as the gate reads it: `success`, `neutral` and `skipped` pass; every
    /// other conclusion fails; anything not concluded is pending.
    CheckState {
        Pending => "pending",
        Passed => "passed",
        Failed => "failed",
    }
}

/// What the checks reported so far decide for a waiting commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckVerdict {
    /// Every required check passed; `passed` names them.
    Passed { passed: Vec<String> },
    /// Nothing deploys, for `reason`; `check` is the one that failed, when one did.
    Failed {
        check: Option<CheckReport>,
        reason: String,
    },
    /// Not decided yet; `waiting_for` says on what. `confirm`: what webhooks reported all
    /// passed, and only GitHub's full list of the commit's checks can tell whether others run.
    Waiting { waiting_for: String, confirm: bool },
}

string_enum! {
    /// The appspec lifecycle events, in CodeDeploy's in-place order.
    Hook {
        ApplicationStop => "ApplicationStop",
        DownloadBundle => "DownloadBundle",
        BeforeInstall => "BeforeInstall",
        Install => "Install",
        AfterInstall => "AfterInstall",
        ApplicationStart => "ApplicationStart",
        ValidateService => "ValidateService",
    }
}

impl Hook {
    /// DownloadBundle and Install are done by the agent itself; an appspec may not hook them.
    pub fn is_scriptable(self) -> bool {
        !matches!(self, Self::DownloadBundle | Self::Install)
    }
}

string_enum! {
    /// Every stage of a deployment, in the order they run: nonstop's own, then the hooks,
    /// with the app's own `release` and `hooks` around the switch (ValidateService's end).
    Stage {
        Fetch => "Fetch",
        Build => "Build",
        Bundle => "Bundle",
        Upload => "Upload",
        ApplicationStop => "ApplicationStop",
        DownloadBundle => "DownloadBundle",
        BeforeInstall => "BeforeInstall",
        Install => "Install",
        AfterInstall => "AfterInstall",
        ApplicationStart => "ApplicationStart",
        Release => "Release",
        BeforeSwitch => "BeforeSwitch",
        ValidateService => "ValidateService",
        AfterSwitch => "AfterSwitch",
    }
}

impl From<Hook> for Stage {
    fn from(hook: Hook) -> Self {
        Stage::parse(hook.as_str()).expect("every hook is also a stage of the same name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_are_path_safe() {
        assert!(AppName::parse("hello-world_2").is_ok());
        for bad in ["", "Hello", "../x", "a b", "a/b", &"x".repeat(65)] {
            assert!(AppName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn commit_ids_are_full_hex() {
        let sha = CommitSha::parse(&"A".repeat(40)).unwrap();
        assert_eq!(sha.as_str(), "a".repeat(40));
        assert_eq!(sha.short(), "aaaaaaa");
        assert!(CommitSha::parse("abc").is_err());
        assert!(CommitSha::parse(&"g".repeat(40)).is_err());
    }

    #[test]
    fn stages_run_in_codedeploy_order_after_nonstops_own() {
        let names: Vec<_> = Stage::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names[..4], ["Fetch", "Build", "Bundle", "Upload"]);
        let hooks: Vec<_> = Hook::ALL.iter().map(|h| Stage::from(*h).as_str()).collect();
        let in_hook_order: Vec<_> = names[4..]
            .iter()
            .filter(|name| Hook::parse(name).is_some())
            .copied()
            .collect();
        assert_eq!(in_hook_order, hooks);
        // The app's own commands run around the switch: after its instance started, and
        // before and after ValidateService.
        assert_eq!(
            names[9..],
            [
                "ApplicationStart",
                "Release",
                "BeforeSwitch",
                "ValidateService",
                "AfterSwitch"
            ]
        );
    }
}
