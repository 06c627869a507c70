//! The users an app's build (`build_as`) and hooks and instances (`run_as`) run as, instead
//! of nonstop's own: resolved once when the config is loaded, dropped to in the child right
//! before `exec` (supplementary groups, group, then user, as CodeDeploy's `runas`), and the
//! folders they must write handed over to them. This is the trust boundary between nonstop
//! and the code it builds and runs; it never gives a child more than that user has.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use tokio::process::Command;

/// A user of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Every group the user is in (its primary one included), as `initgroups` would set.
    pub groups: Vec<u32>,
    pub home: PathBuf,
}

impl User {
    /// The user named `name` in this host's user database (`None`: there is none).
    pub fn lookup(name: &str) -> std::io::Result<Option<Self>> {
        let c_name = CString::new(name).map_err(std::io::Error::other)?;
        let mut buffer = vec![0u8; 16 * 1024];
        // SAFETY: passwd is plain old data; getpwnam_r fills it with pointers into `buffer`,
        // which outlives every read of them below.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        loop {
            // SAFETY: every pointer is valid for the call; the sizes are the buffers' own.
            let status = unsafe {
                libc::getpwnam_r(
                    c_name.as_ptr(),
                    &mut entry,
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    &mut found,
                )
            };
            match status {
                0 => break,
                libc::ERANGE if buffer.len() < 1024 * 1024 => buffer.resize(buffer.len() * 4, 0),
                errno => return Err(std::io::Error::from_raw_os_error(errno)),
            }
        }
        if found.is_null() {
            return Ok(None);
        }
        // SAFETY: getpwnam_r succeeded, so pw_dir points at a NUL-terminated string in `buffer`.
        let home = unsafe { std::ffi::CStr::from_ptr(entry.pw_dir) };
        let home = PathBuf::from(home.to_string_lossy().into_owned());
        let (uid, gid) = (entry.pw_uid, entry.pw_gid);
        Ok(Some(Self {
            name: name.to_owned(),
            uid,
            gid,
            groups: groups_of(&c_name, gid)?,
            home,
        }))
    }

    /// Makes `command` run as this user: its groups, group and user are set in the child
    /// before `exec` (a failure there fails the spawn), and `HOME` is the user's.
    pub fn apply(&self, command: &mut Command) {
        let (uid, gid, groups) = (self.uid, self.gid, self.groups.clone());
        command.env("HOME", &self.home);
        // SAFETY: setgroups, setgid and setuid are async-signal-safe and `groups` was
        // allocated before the fork; nothing here allocates. The order matters: once the
        // user is set, the groups can no longer be changed. This runs before the process
        // module's own pre_exec, whose PR_SET_PDEATHSIG a change of user would clear.
        unsafe {
            command.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Gives `path` and everything under it (links themselves, never what they point at) to
    /// this user, so that a build or a hook running as it may write there. The walk goes by
    /// open directory descriptors, never by path again: the user may already write under
    /// `path` (its `run/` folder), and an entry swapped for a link to `/etc` between a look
    /// and a chown must not hand `/etc` over. `path` itself lies in a folder only nonstop
    /// may change.
    pub fn hand_over(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))?;
        match open_dir_nofollow(libc::AT_FDCWD, &path_cstring(path)?) {
            Ok(dir) => self.hand_over_in(&dir),
            Err(err) if is_not_a_dir(&err) => Ok(()),
            Err(err) => Err(err),
        }
    }

    fn hand_over_in(&self, dir: &std::os::fd::OwnedFd) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        // The directory as opened, whatever its path names now.
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
        for entry in listing {
            let name = CString::new(entry?.file_name().as_bytes())
                .map_err(|_| std::io::Error::other("a file name with a NUL byte"))?;
            // SAFETY: `dir` is an open directory and `name` a NUL-terminated entry name;
            // AT_SYMLINK_NOFOLLOW makes a link change hands, never what it points at.
            let changed = unsafe {
                libc::fchownat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    self.uid,
                    self.gid,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            if changed != 0 {
                return Err(std::io::Error::last_os_error());
            }
            match open_dir_nofollow(dir.as_raw_fd(), &name) {
                Ok(sub) => self.hand_over_in(&sub)?,
                Err(err) if is_not_a_dir(&err) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

/// Opens `name` (relative to `dir`) as a directory, refusing a link.
fn open_dir_nofollow(
    dir: libc::c_int,
    name: &std::ffi::CStr,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: `name` is NUL-terminated; the returned descriptor is owned by nobody else.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is not shared.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A link or a plain file where a directory was tried: nothing to walk into.
fn is_not_a_dir(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP))
}

fn path_cstring(path: &Path) -> std::io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))
}

/// The groups `name` is in (with `gid`, its primary group).
fn groups_of(name: &CString, gid: u32) -> std::io::Result<Vec<u32>> {
    let mut count: libc::c_int = 32;
    loop {
        let mut groups = vec![0 as libc::gid_t; count as usize];
        let asked = count;
        // SAFETY: `groups` holds `count` entries, and getgrouplist writes at most that many
        // (it sets `count` to how many there are when they do not fit).
        let found =
            unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        if found >= 0 {
            groups.truncate(count as usize);
            return Ok(groups);
        }
        if count <= asked {
            count = asked * 2;
        }
        if count > 65_536 {
            return Err(std::io::Error::other("the user is in too many groups"));
        }
    }
}

/// Lets other users pass through `dir` (to a folder handed over to them) without listing
/// or reading it: mode 0711.
pub fn pass_through(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_nobody_are_found_and_a_stranger_is_not() {
        let root = User::lookup("root").unwrap().expect("every host has root");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{:?}", root.groups);
        assert_eq!(root.home, PathBuf::from("/root"));
        let nobody = User::lookup("nobody").unwrap().expect("nobody exists");
        assert_ne!(nobody.uid, 0);
        assert_eq!(User::lookup("no-such-user-here").unwrap(), None);
    }

    #[tokio::test]
    async fn a_child_runs_as_the_user_with_its_home() {
        let nobody = User::lookup("nobody").unwrap().unwrap();
        let mut command = crate::process::ChildEnv::base().command("sh");
        command.args(["-c", "id -u; id -g; echo $HOME"]);
        nobody.apply(&mut command);
        let done = crate::process::run(command, std::time::Duration::from_secs(10)).await;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let done = done.unwrap();
            assert!(done.success, "{}: {}", done.status, done.log);
            let expected = format!(
                "{}\n{}\n{}\n",
                nobody.uid,
                nobody.gid,
                nobody.home.display()
            );
            assert_eq!(done.log, expected);
        } else {
            // Only root may become another user: the child never starts.
            let err = done.unwrap_err().to_string();
            assert!(err.contains("Operation not permitted"), "{err}");
        }
    }

    #[test]
    fn handing_over_a_tree_changes_links_never_what_they_point_at() {
        use std::os::unix::fs::MetadataExt;
        let nobody = User::lookup("nobody").unwrap().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), "x").unwrap();
        let tree = dir.path().join("run");
        std::fs::create_dir_all(tree.join("sub")).unwrap();
        std::fs::write(tree.join("sub/log"), "y").unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("sub/escape")).unwrap();
        let owner_before = std::fs::metadata(outside.join("secret")).unwrap().uid();

        let handed = nobody.hand_over(&tree);

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            handed.unwrap();
            for inside in ["", "sub", "sub/log"] {
                let path = tree.join(inside);
                assert_eq!(
                    std::fs::metadata(&path).unwrap().uid(),
                    nobody.uid,
                    "{inside:?}"
                );
            }
            let link = std::fs::symlink_metadata(tree.join("sub/escape")).unwrap();
            assert_eq!(link.uid(), nobody.uid, "the link itself changes hands");
        } else {
            // Only root may give files away.
            assert!(handed.is_err());
        }
        for untouched in [&outside, &outside.join("secret")] {
            let meta = std::fs::metadata(untouched).unwrap();
            assert_eq!(meta.uid(), owner_before, "{}", untouched.display());
        }
    }
}
