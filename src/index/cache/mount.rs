//! The index file mounted from the cache ConfigMap, and its reload when kubelet swaps it.
//!
//! Kubelet never writes `cache.json` in place: it writes a new `..YYYY_MM_DD…` directory,
//! points `..data_tmp` at it and renames that over `..data`; `cache.json` is a symlink through
//! `..data`. A watch on the file dies with the old directory, so we watch the directory itself
//! (non-recursively, inotify) and re-read through the link on any event.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::index::cache::codec::{self, CodecError, Form};
use crate::index::table::Index;

/// Quiet time after the last event before re-reading: one kubelet swap is four events.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub enum MountState {
    /// No index file in the directory (the ConfigMap is absent or the volume not mounted).
    Absent,
    Invalid(String),
    Loaded(Index, Form),
}

/// Reads whichever form is mounted. Shards come from the same directory (a projected volume).
pub fn load(dir: &Path) -> MountState {
    let read = |name: &str| std::fs::read(dir.join(name)).ok();
    // The plain form, the common one, is parsed straight from the file's bytes: no UTF-8
    // copy of a multi-megabyte file at start-up, when memory peaks.
    if let Some(bytes) = read(codec::PLAIN_KEY) {
        return match Index::from_json(&bytes) {
            Ok(index) => MountState::Loaded(index, Form::Plain),
            Err(e) => MountState::Invalid(format!("{}: {}", dir.display(), CodecError::from(e))),
        };
    }
    let mut data = BTreeMap::new();
    let mut binary = BTreeMap::new();
    if let Some(bytes) = read(codec::MANIFEST_KEY) {
        data.insert(
            codec::MANIFEST_KEY.to_string(),
            String::from_utf8_lossy(&bytes).into_owned(),
        );
    }
    if let Some(bytes) = read(codec::GZIP_KEY) {
        binary.insert(codec::GZIP_KEY.to_string(), bytes);
    }
    match codec::decode(&data, &binary, |i| read(&codec::shard_key(i))) {
        Ok((index, form)) => MountState::Loaded(index, form),
        Err(CodecError::Empty) => MountState::Absent,
        Err(e) => MountState::Invalid(format!("{}: {e}", dir.display())),
    }
}

/// Identity of the mounted index files: kubelet's `..data` link target, and (key, device,
/// inode, size, mtime) of each file present, links followed. Kubelet's atomic writer puts
/// every update in a new directory; inode, size and mtime also catch files written in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    /// Where `..data` points: kubelet names every update's directory uniquely.
    data_link: Option<PathBuf>,
    files: Vec<(String, u64, u64, u64, Option<SystemTime>)>,
}

/// `None` when nothing can be said (an unreadable directory): the caller then reads anyway.
pub fn fingerprint(dir: &Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    let entries = std::fs::read_dir(dir).ok()?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let relevant = name == codec::PLAIN_KEY
            || name == codec::MANIFEST_KEY
            || name.starts_with(codec::GZIP_KEY);
        if !relevant {
            continue;
        }
        // Follows the `..data/` link to the file kubelet wrote.
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        files.push((
            name,
            meta.dev(),
            meta.ino(),
            meta.len(),
            meta.modified().ok(),
        ));
    }
    files.sort();
    Some(Fingerprint {
        data_link: std::fs::read_link(dir.join("..data")).ok(),
        files,
    })
}

#[derive(Debug, thiserror::Error)]
#[error("watching {dir}: {message}")]
pub struct WatchError {
    pub dir: PathBuf,
    pub message: String,
}

/// Watches `dir` and sends one notification per burst of events (debounced).
///
/// The returned watcher must be kept alive. If `dir` does not exist yet, the caller retries.
pub fn watch(dir: &Path) -> Result<(RecommendedWatcher, mpsc::Receiver<()>), WatchError> {
    let (raw_tx, mut raw_rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = raw_tx.send(());
        }
    })
    .map_err(|e| WatchError {
        dir: dir.to_path_buf(),
        message: e.to_string(),
    })?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .map_err(|e| WatchError {
            dir: dir.to_path_buf(),
            message: e.to_string(),
        })?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            // Debounce: wait until the events stop for DEBOUNCE.
            loop {
                match tokio::time::timeout(DEBOUNCE, raw_rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    Ok((watcher, rx))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Writes `files` the way kubelet's atomic writer does: a timestamped directory, a
    /// `..data_tmp` link renamed over `..data`, and per-key links through `..data`.
    pub fn kubelet_swap(dir: &Path, generation: u32, files: &[(&str, &[u8])]) {
        let ts = format!("..2026_11_25_00_00_00.{generation:09}");
        let new_dir = dir.join(&ts);
        std::fs::create_dir_all(&new_dir).unwrap();
        for (name, bytes) in files {
            std::fs::write(new_dir.join(name), bytes).unwrap();
        }
        let old = std::fs::read_link(dir.join("..data")).ok();
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        for (name, _) in files {
            let link = dir.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                symlink(Path::new("..data").join(name), &link).unwrap();
            }
        }
        if let Some(old) = old {
            let _ = std::fs::remove_dir_all(dir.join(old));
        }
    }

    #[test]
    fn loads_plain_and_reports_absent_and_invalid() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load(dir.path()), MountState::Absent));
        kubelet_swap(
            dir.path(),
            1,
            &[(
                "cache.json",
                b"{\"images\":{\"nginx\":[{\"name\":\"a\",\"namespace\":\"b\"}]}}",
            )],
        );
        let MountState::Loaded(index, Form::Plain) = load(dir.path()) else {
            panic!("expected plain index")
        };
        assert_eq!(index.workload_count(), 1);
        kubelet_swap(dir.path(), 2, &[("cache.json", b"{corrupt")]);
        assert!(matches!(load(dir.path()), MountState::Invalid(_)));
    }

    #[test]
    fn fingerprint_changes_with_every_swap_only() {
        let dir = tempfile::tempdir().unwrap();
        let empty = fingerprint(dir.path()).unwrap();
        kubelet_swap(dir.path(), 1, &[("cache.json", b"{\"images\":{}}")]);
        let first = fingerprint(dir.path()).unwrap();
        assert_ne!(first, empty);
        assert_eq!(
            fingerprint(dir.path()).unwrap(),
            first,
            "stable without a swap"
        );
        // The same bytes again: still a new update as far as kubelet is concerned.
        kubelet_swap(dir.path(), 2, &[("cache.json", b"{\"images\":{}}")]);
        assert_ne!(fingerprint(dir.path()).unwrap(), first);
        assert!(fingerprint(&dir.path().join("missing")).is_none());
    }

    #[tokio::test]
    async fn watch_fires_on_kubelet_swap() {
        let dir = tempfile::tempdir().unwrap();
        kubelet_swap(dir.path(), 1, &[("cache.json", b"{\"images\":{}}")]);
        let (_w, mut rx) = watch(dir.path()).unwrap();
        for generation in 2..5 {
            kubelet_swap(
                dir.path(),
                generation,
                &[("cache.json", b"{\"images\":{}}")],
            );
            tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("event within 2 s")
                .expect("channel open");
        }
    }
}
