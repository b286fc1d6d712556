//! The VMM's jail (issue 16 item 1): see [`enter`].

use std::sync::Mutex;

static NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Record something the jail could not apply (and why); it goes into the run summary.
pub fn note(s: impl Into<String>) {
    let s = s.into();
    tracing::warn!("jail: {s}");
    NOTES.lock().unwrap_or_else(|p| p.into_inner()).push(s);
}

/// What the jail recorded so far.
pub fn notes() -> Vec<String> {
    NOTES.lock().unwrap_or_else(|p| p.into_inner()).clone()
}
