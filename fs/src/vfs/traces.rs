//! Load traces in the mount: a content's first-touch read order is recorded
//! while it is open in copy mode, saved when its last handle closes (or at
//! unmount), and replayed ahead of the reader at its next first open.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use modelfs_store::{trace, ContentId, ContentInfo};
use tracing::warn;

use super::Vfs;
use crate::open_content::{ContentState, OpenContent};

impl Vfs {
    /// Save `state`'s recording of `content` if it covers more than the
    /// trace already on disk.
    pub(super) fn save_trace(&self, content: &ContentInfo, state: &ContentState) {
        let recorder = state.recorder.lock().expect("recorder lock");
        let covered = recorder.covered();
        if covered <= state.saved_covered.load(Ordering::Relaxed) {
            return;
        }
        match trace::write_trace(&self.store_root, &content.hash, recorder.trace()) {
            Ok(()) => {
                state.saved_covered.store(covered, Ordering::Relaxed);
                self.stats.traces_saved.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.trace_errors.fetch_add(1, Ordering::Relaxed);
                warn!("cannot save a load trace: {e}");
            }
        }
    }

    /// Save every trace still being recorded (at unmount).
    pub fn save_all_traces(&self) {
        let tree = self.tree();
        let states: Vec<(ContentId, Arc<ContentState>)> = self
            .contents
            .lock()
            .expect("contents lock")
            .iter()
            .map(|(&id, st)| (id, st.clone()))
            .collect();
        for (id, state) in states {
            if let Some(f) = tree.files.get(&crate::tree::file_ino(id)) {
                self.save_trace(&f.content, &state);
            }
        }
    }

    /// At the first open of a content (again, after all its handles were
    /// closed), replay its recorded trace ahead of the reader.
    pub(super) fn start_replay(&self, open: &Arc<OpenContent>) {
        if self.prefetch_window == 0 || open.state.replaying.swap(true, Ordering::AcqRel) {
            return;
        }
        let content = open.content();
        let Some(trace) = trace::read_trace(&self.store_root, &content.hash, content.size) else {
            open.state.end_replay();
            return;
        };
        self.stats.trace_replays.fetch_add(1, Ordering::Relaxed);
        crate::prefetch::spawn_replay(open.clone(), trace, self.prefetch_window);
    }

    /// Trace replays in progress now.
    pub fn replays_running(&self) -> usize {
        let states = self.contents.lock().expect("contents lock");
        states
            .values()
            .filter(|st| st.replaying.load(Ordering::Acquire))
            .count()
    }
}
