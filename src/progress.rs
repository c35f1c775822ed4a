//! Progress on stderr: one `indicatif` bar per phase of a fit (rounds, candidates, steps) while
//! stderr is a terminal, one line per finished round otherwise, nothing when hidden; and the
//! bars of a file being written and of documents being evaluated.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where a fit reports its progress.
pub struct Progress {
    multi: MultiProgress,
    /// Whether notes go to stderr (as lines above the bars, or plain lines without a terminal).
    notes: bool,
    terminal: bool,
}

impl Progress {
    /// Bars on stderr when it is a terminal; otherwise only the notes, as plain lines.
    pub fn stderr() -> Self {
        let terminal = std::io::stderr().is_terminal();
        let target = if terminal {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Self {
            multi: MultiProgress::with_draw_target(target),
            notes: true,
            terminal,
        }
    }

    /// Nothing at all (tests, library callers).
    pub fn hidden() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            notes: false,
            terminal: false,
        }
    }

    /// A bar of `len` units labelled `prefix`; finish it with [`ProgressBar::finish_and_clear`].
    pub(crate) fn bar(&self, len: usize, prefix: &str) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(len as u64));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{bar:25}] {pos}/{len} {elapsed_precise} eta {eta} {msg}",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        bar.set_prefix(prefix.to_string());
        bar
    }

    /// A line of progress: above the bars on a terminal, on stderr otherwise.
    pub(crate) fn note(&self, line: &str) {
        if !self.notes {
            return;
        }
        if self.terminal {
            let _ = self.multi.println(line);
        } else {
            eprintln!("{line}");
        }
    }
}

/// A bar over the bytes of a file being written, labelled `message`.
pub fn bytes_bar(message: String) -> ProgressBar {
    styled(
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        message,
    )
}

/// A bar over the documents being evaluated.
pub fn docs_bar() -> ProgressBar {
    styled(
        "{msg} [{bar:30}] {pos}/{len} docs {per_sec} eta {eta}",
        String::new(),
    )
}

fn styled(template: &str, message: String) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar
}
