//! The live console of each running deployment: every stage's header, the lines its
//! processes print as they print them (build, git, each hook's scripts), and how it ended,
//! in the order they happened. The follow endpoint and the deployment page read it while the
//! deployment runs; the database keeps each stage's log for good (written at the stage's end,
//! and every second while a streamed stage runs).
//!
//! A console is bounded like any log (`process::Tail`) and forgotten when its deployment
//! ends. Its lines are numbered from the first, so a follower that joins late (a snapshot,
//! then what comes) or falls behind (a new snapshot) shows each line once and in order. It
//! never holds a secret: what reaches it was redacted by the step that printed it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::domain::DeploymentId;
use crate::process::Tail;

/// Batches of lines a follower may fall behind by before it must take a new snapshot.
const BATCHES_BUFFERED: usize = 4096;

/// Whole lines of one deployment's console; `first` is the number of the first of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Lines {
    pub deployment_id: DeploymentId,
    pub first: u64,
    pub text: Arc<str>,
}

/// What a follower hears: lines, or that a deployment's console ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    Lines(Lines),
    End(DeploymentId),
}

#[derive(Default)]
struct Console {
    tail: Tail,
    printed: u64,
}

/// Every running deployment's console. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct Output {
    consoles: Arc<Mutex<HashMap<DeploymentId, Console>>>,
    pieces: broadcast::Sender<Piece>,
}

/// A follower's start: the console so far (when the deployment runs here) and what comes.
pub struct Follow {
    pub snapshot: Option<Lines>,
    pub pieces: broadcast::Receiver<Piece>,
}

impl Output {
    pub fn new() -> Self {
        Self {
            consoles: Arc::default(),
            pieces: broadcast::channel(BATCHES_BUFFERED).0,
        }
    }

    fn consoles(&self) -> std::sync::MutexGuard<'_, HashMap<DeploymentId, Console>> {
        self.consoles.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens `id`'s console (its deployment starts running).
    pub fn begin(&self, id: DeploymentId) {
        self.consoles().entry(id).or_default();
    }

    /// Adds whole lines (each ending in `\n`) to `id`'s console and tells its followers.
    pub fn push(&self, id: DeploymentId, text: &str) {
        if text.is_empty() {
            return;
        }
        let mut consoles = self.consoles();
        let console = consoles.entry(id).or_default();
        let first = console.printed;
        console.printed += text.matches('\n').count() as u64;
        console.tail.push(text);
        // Sent under the lock, so a follower's snapshot and its pieces never overlap.
        let _ = self.pieces.send(Piece::Lines(Lines {
            deployment_id: id,
            first,
            text: text.into(),
        }));
    }

    /// Closes `id`'s console: its deployment ended and the database holds its logs.
    pub fn end(&self, id: DeploymentId) {
        let mut consoles = self.consoles();
        consoles.remove(&id);
        let _ = self.pieces.send(Piece::End(id));
    }

    /// What a follower of `id` starts from: taken with the subscription under one lock, so
    /// every line is either in the snapshot or among the pieces.
    pub fn follow(&self, id: DeploymentId) -> Follow {
        let consoles = self.consoles();
        let snapshot = consoles.get(&id).map(|console| {
            let text = console.tail.kept();
            Lines {
                deployment_id: id,
                first: console.printed - text.matches('\n').count() as u64,
                text: text.into(),
            }
        });
        Follow {
            snapshot,
            pieces: self.pieces.subscribe(),
        }
    }
}

impl Default for Output {
    fn default() -> Self {
        Self::new()
    }
}

/// Which lines of a console a follower has shown, so none is shown twice.
#[derive(Debug, Default)]
pub struct Seen(u64);

impl Seen {
    /// The part of `lines` not shown yet (empty when all of it was); lines before the
    /// first one kept are gone, and a gap says so.
    pub fn fresh<'a>(&mut self, lines: &'a Lines) -> std::borrow::Cow<'a, str> {
        let count = lines.text.matches('\n').count() as u64;
        let end = lines.first + count;
        if end <= self.0 {
            return "".into();
        }
        let skip = self.0.saturating_sub(lines.first) as usize;
        let text = match skip {
            0 => &lines.text[..],
            n => lines
                .text
                .match_indices('\n')
                .nth(n - 1)
                .map_or("", |(at, _)| &lines.text[at + 1..]),
        };
        let gap = lines.first.saturating_sub(self.0);
        self.0 = end;
        if gap > 0 {
            format!("[… {gap} lines not kept]\n{text}").into()
        } else {
            text.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> DeploymentId {
        DeploymentId::new(3)
    }

    #[test]
    fn a_late_follower_sees_each_line_once_in_order() {
        let output = Output::new();
        output.begin(id());
        output.push(id(), "one\ntwo\n");
        let mut follow = output.follow(id());
        output.push(id(), "three\n");
        output.push(DeploymentId::new(4), "elsewhere\n");
        output.end(id());

        let mut seen = Seen::default();
        let mut shown = seen.fresh(&follow.snapshot.unwrap()).into_owned();
        // Pieces that overlap what was shown (a repeated batch) add nothing.
        let mut replayed = Lines {
            deployment_id: id(),
            first: 1,
            text: "two\nthree\n".into(),
        };
        shown += &seen.fresh(&replayed);
        loop {
            match follow.pieces.try_recv().unwrap() {
                Piece::End(ended) if ended == id() => break,
                Piece::End(_) => {}
                Piece::Lines(lines) if lines.deployment_id == id() => shown += &seen.fresh(&lines),
                Piece::Lines(_) => {}
            }
        }
        assert_eq!(shown, "one\ntwo\nthree\n");
        replayed.first = 0;
        assert_eq!(seen.fresh(&replayed), "");
    }

    #[test]
    fn a_console_is_gone_once_its_deployment_ended() {
        let output = Output::new();
        output.push(id(), "line\n");
        output.end(id());

        let follow = output.follow(id());

        assert!(follow.snapshot.is_none());
    }

    #[test]
    fn lines_a_follower_missed_are_counted_not_shown_as_if_whole() {
        let mut seen = Seen::default();
        let first = Lines {
            deployment_id: id(),
            first: 0,
            text: "a\n".into(),
        };
        assert_eq!(seen.fresh(&first), "a\n");
        let later = Lines {
            deployment_id: id(),
            first: 5,
            text: "f\n".into(),
        };

        assert_eq!(seen.fresh(&later), "[… 4 lines not kept]\nf\n");
    }
}
