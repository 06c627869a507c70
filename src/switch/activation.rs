//! Listening sockets handed to this process by its service manager (systemd socket
//! activation, `sd_listen_fds(3)`): when `LISTEN_PID` is this process and `LISTEN_FDS` is N,
//! fds 3 to 3+N-1 are open listening sockets, named in `LISTEN_FDNAMES` (colon-separated)
//! when the socket unit says `FileDescriptorName=`. The manager keeps them open while the
//! proxy is down, so a crashed proxy only queues new connections in the kernel's backlog
//! until it is back. This module only finds and takes those sockets; it never binds one.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{FromRawFd, RawFd};

/// The first fd a service manager passes (after stdin, stdout, stderr).
const SD_LISTEN_FDS_START: RawFd = 3;

/// Sockets the service manager passed that no app has taken yet.
#[derive(Default)]
pub struct Inherited {
    sockets: Vec<Passed>,
}

struct Passed {
    name: Option<String>,
    addr: SocketAddr,
    listener: TcpListener,
}

impl Inherited {
    /// The TCP listening sockets passed to this process, if any; other fds (and everything
    /// when `LISTEN_PID` names another process) are left alone.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok();
        let pid = std::process::id().to_string();
        if var("LISTEN_PID").as_deref() != Some(pid.as_str()) {
            return Self::default();
        }
        let count: RawFd = var("LISTEN_FDS").and_then(|n| n.parse().ok()).unwrap_or(0);
        let names: Vec<String> = var("LISTEN_FDNAMES")
            .map(|names| names.split(':').map(str::to_owned).collect())
            .unwrap_or_default();
        let mut sockets = Vec::new();
        for (index, fd) in (SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count).enumerate() {
            if !is_listening_socket(fd) {
                tracing::warn!(fd, "ignoring a passed fd that is not a listening socket");
                continue;
            }
            // SAFETY: the protocol hands this fd to this process, and this is the one place
            // that takes it (once: `from_env` is called once, at start-up).
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            // Nothing this process starts may inherit it.
            // SAFETY: fcntl on an fd this process owns.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            match listener.local_addr() {
                Ok(addr) => sockets.push(Passed {
                    name: names.get(index).filter(|n| !n.is_empty()).cloned(),
                    addr,
                    listener,
                }),
                Err(err) => tracing::warn!(fd, error = %err, "ignoring a passed socket"),
            }
        }
        Self { sockets }
    }

    /// The passed sockets for the app `name` listening on `listen`: those named after the
    /// app (a handover passes one per worker), else those bound to that address. Empty when
    /// none was passed.
    pub fn take(&mut self, name: &str, listen: SocketAddr) -> Vec<TcpListener> {
        let named = self.sockets.iter().any(|s| s.name.as_deref() == Some(name));
        let (taken, left) =
            std::mem::take(&mut self.sockets)
                .into_iter()
                .partition(|s: &Passed| {
                    if named {
                        s.name.as_deref() == Some(name)
                    } else {
                        s.addr == listen
                    }
                });
        self.sockets = left;
        taken.into_iter().map(|s| s.listener).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }

    /// Addresses of passed sockets no app took (a unit that names an address no app has).
    pub fn left(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.sockets.iter().map(|s| s.addr)
    }
}

/// Whether `fd` is an open socket in the listening state.
fn is_listening_socket(fd: RawFd) -> bool {
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `listening`; an fd that is not a
    // socket makes it fail, which is the answer.
    let read = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    read == 0 && listening != 0
}
