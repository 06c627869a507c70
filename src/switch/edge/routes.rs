//! Which site a request's host names: exact names first, then a wildcard for one label
//! below a name (`*.example.com` takes `a.example.com`, not `a.b.example.com` nor
//! `example.com`), then the default site, if any. Pure: no I/O, and a lookup allocates
//! nothing (a host is lowercased into a stack buffer).

use std::collections::HashMap;

use crate::config::HostName;

/// The longest DNS name; a longer host can name no site.
const MAX_HOST: usize = 253;

/// Host → site index.
#[derive(Debug, Default)]
pub struct Routes {
    exact: HashMap<Box<str>, usize>,
    /// Keyed by the name below the `*.`.
    wildcard: HashMap<Box<str>, usize>,
    default: Option<usize>,
}

impl Routes {
    /// `sites[i]` are the names of site `i`; config validation already made every name
    /// unique.
    pub fn new<'a>(
        sites: impl IntoIterator<Item = &'a [HostName]>,
        default: Option<usize>,
    ) -> Self {
        let mut routes = Self {
            default,
            ..Self::default()
        };
        for (site, names) in sites.into_iter().enumerate() {
            for name in names {
                match name.as_str().strip_prefix("*.") {
                    Some(below) => routes.wildcard.insert(below.into(), site),
                    None => routes.exact.insert(name.as_str().into(), site),
                };
            }
        }
        routes
    }

    /// The site for `host` (a `Host` header or `:authority`: a name, perhaps with a port
    /// and a trailing dot, in any case), else the default site.
    pub fn route(&self, host: &str) -> Option<usize> {
        self.named(host).or(self.default)
    }

    /// The site that claims `host` by name, without the default.
    pub fn named(&self, host: &str) -> Option<usize> {
        let mut buffer = [0u8; MAX_HOST];
        let name = lowercase_name(host, &mut buffer)?;
        if let Some(site) = self.exact.get(name) {
            return Some(*site);
        }
        let (_, below) = name.split_once('.')?;
        self.wildcard.get(below).copied()
    }
}

/// `host` without its port and trailing dot, lowercased into `buffer`; `None` for an IP
/// literal in brackets or anything too long to be a name.
fn lowercase_name<'a>(host: &str, buffer: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    if host.starts_with('[') {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => host,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_HOST {
        return None;
    }
    let out = &mut buffer[..name.len()];
    out.copy_from_slice(name.as_bytes());
    out.make_ascii_lowercase();
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<HostName> {
        list.iter()
            .map(|n| HostName::try_from(n.to_string()).unwrap())
            .collect()
    }

    #[test]
    fn exact_names_win_over_wildcards_and_a_wildcard_takes_one_label() {
        let hello = names(&["hello.example.com", "*.hello.example.com"]);
        let admin = names(&["admin.hello.example.com"]);
        let routes = Routes::new([hello.as_slice(), admin.as_slice()], None);

        assert_eq!(routes.route("hello.example.com"), Some(0));
        assert_eq!(routes.route("Hello.Example.COM:443"), Some(0));
        assert_eq!(routes.route("hello.example.com."), Some(0));
        assert_eq!(routes.route("eu.hello.example.com"), Some(0));
        assert_eq!(
            routes.route("admin.hello.example.com"),
            Some(1),
            "exact first"
        );
        assert_eq!(
            routes.route("a.eu.hello.example.com"),
            None,
            "one label only"
        );
        assert_eq!(routes.route("example.com"), None);
        assert_eq!(routes.route("[::1]:443"), None);
        assert_eq!(routes.route("127.0.0.1:80"), None);
        assert_eq!(routes.route(""), None);
        assert_eq!(routes.route("hello.example.com:https"), None);
        assert_eq!(routes.route(&"a".repeat(300)), None);
    }

    #[test]
    fn an_unclaimed_host_goes_to_the_default_site_when_there_is_one() {
        let hello = names(&["hello.test"]);
        let routes = Routes::new([hello.as_slice()], Some(0));
        assert_eq!(routes.route("other.test"), Some(0));
        assert_eq!(routes.named("other.test"), None);
    }
}
