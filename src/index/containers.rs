//! A workload's containers as the live view keeps them: packed into two allocations.
//!
//! The view holds every workload in scope, and at 100,000 workloads of five images each the
//! containers were its largest part: a `Vec` of structs with a boxed name and a shared image
//! string each, eleven allocations per workload and 800 B. Here one string holds every name
//! and image back to back and one slice of fixed-size entries says where each starts: two
//! allocations and about 450 B. Readers get a [`Container`], borrowed from that string.

use std::fmt;

use crate::index::workload::{ContainerImage, PullPolicy};
use crate::ingest::image::ImageRef;

/// A pod template's containers, then its init containers, packed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Containers {
    /// Per container: its name, then its image key, then its spelling (where kept).
    text: Box<str>,
    entries: Box<[Entry]>,
}

/// Where one container's strings sit in [`Containers::text`], and its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    start: u32,
    name_len: u32,
    /// `NONE`: no tag reference to index it under.
    image_len: u32,
    /// `NONE`: spelled as its image key.
    written_len: u32,
    init: bool,
    pull_policy: Option<PullPolicy>,
}

const NONE: u32 = u32::MAX;

/// One container, borrowed from its [`Containers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Container<'a> {
    pub container: &'a str,
    pub init: bool,
    /// The normalised tag reference it is indexed under (see
    /// [`ContainerImage::image`](crate::index::workload::ContainerImage::image)).
    pub image: Option<&'a str>,
    pub pull_policy: Option<PullPolicy>,
    written: Option<&'a str>,
}

impl Container<'_> {
    /// Whether it runs the tag `image`.
    pub fn runs(&self, image: &ImageRef) -> bool {
        self.image == Some(image.as_str())
    }

    /// The image as the pod template writes it.
    pub fn spelled(&self) -> Option<&str> {
        self.written.or(self.image)
    }

    /// Whether the pod template pins a digest (`…@sha256:…`): a restart cannot change it.
    pub fn digest_pinned(&self) -> bool {
        self.written.is_some_and(|w| w.contains('@'))
    }

    /// The image as written when it is not an indexable tag reference: what a scan warns of.
    pub fn unindexed(&self) -> Option<&str> {
        match self.image {
            None => self.written,
            Some(_) => None,
        }
    }
}

impl Containers {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<Container<'_>> {
        self.entries.get(i).map(|e| self.unpack(e))
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = Container<'_>> + Clone + '_ {
        self.entries.iter().map(|e| self.unpack(e))
    }

    fn unpack(&self, e: &Entry) -> Container<'_> {
        let mut at = e.start as usize;
        let mut take = |len: u32| {
            (len != NONE).then(|| {
                let s = self.text.get(at..at + len as usize).unwrap_or_default();
                at += len as usize;
                s
            })
        };
        let container = take(e.name_len).unwrap_or_default();
        let image = take(e.image_len);
        let written = take(e.written_len);
        Container {
            container,
            init: e.init,
            image,
            pull_policy: e.pull_policy,
            written,
        }
    }
}

impl FromIterator<ContainerImage> for Containers {
    fn from_iter<I: IntoIterator<Item = ContainerImage>>(iter: I) -> Self {
        let all: Vec<ContainerImage> = iter.into_iter().collect();
        let len = |s: Option<&str>| s.map_or(0, str::len);
        let total: usize = all
            .iter()
            .map(|c| {
                c.container.len()
                    + len(c.image.as_ref().map(ImageRef::as_str))
                    + len(c.written.as_deref())
            })
            .sum();
        let mut text = String::with_capacity(total);
        let mut entries = Vec::with_capacity(all.len());
        for c in &all {
            let start = text.len();
            let mut put = |s: Option<&str>| match s {
                Some(s) => {
                    text.push_str(s);
                    s.len()
                }
                None => NONE as usize,
            };
            let name_len = put(Some(&c.container));
            let image_len = put(c.image.as_ref().map(ImageRef::as_str));
            let written_len = put(c.written.as_deref());
            // The API server caps an object at a few MiB, so offsets always fit in a u32; a
            // hand-made one past 4 GiB keeps the containers that do.
            if text.len() >= NONE as usize {
                text.truncate(start);
                break;
            }
            let narrow = |n: usize| n as u32;
            entries.push(Entry {
                start: narrow(start),
                name_len: narrow(name_len),
                image_len: narrow(image_len),
                written_len: narrow(written_len),
                init: c.init,
                pull_policy: c.pull_policy,
            });
        }
        Self {
            text: text.into_boxed_str(),
            entries: entries.into_boxed_slice(),
        }
    }
}

impl From<Vec<ContainerImage>> for Containers {
    fn from(all: Vec<ContainerImage>) -> Self {
        all.into_iter().collect()
    }
}

impl fmt::Debug for Containers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::image::index_key;

    fn container(name: &str, init: bool, image: &str, policy: &str) -> ContainerImage {
        let key = index_key(image);
        ContainerImage {
            container: name.into(),
            init,
            written: (key.as_ref().map(ImageRef::as_str) != Some(image)).then(|| image.into()),
            image: key,
            pull_policy: PullPolicy::declared(policy),
        }
    }

    #[test]
    fn every_field_reads_back_as_packed() {
        let pinned = format!("gcr.io/p/app:v1@sha256:{}", "2".repeat(64));
        let by_hand = format!("gcr.io/p/app@sha256:{}", "3".repeat(64));
        let packed: Containers = vec![
            container("app", false, "europe-docker.pkg.dev/p/r/app:v1", "Always"),
            container("sidecar", false, "nginx", ""),
            container("migrate", true, &pinned, "IfNotPresent"),
            container("hand", false, &by_hand, "Never"),
            container("", false, "bad image!", ""),
        ]
        .into();
        assert_eq!(packed.len(), 5);
        let all: Vec<Container<'_>> = packed.iter().collect();

        assert_eq!(all[0].container, "app");
        assert_eq!(all[0].image, Some("europe-docker.pkg.dev/p/r/app:v1"));
        assert_eq!(all[0].spelled(), all[0].image, "not stored twice");
        assert_eq!(all[0].pull_policy, Some(PullPolicy::Always));
        assert!(!all[0].init && !all[0].digest_pinned());

        assert_eq!(all[1].image, Some("docker.io/library/nginx:latest"));
        assert_eq!(all[1].spelled(), Some("nginx"), "the spelling as written");
        assert_eq!(all[1].pull_policy, None);
        assert!(all[1].runs(&ImageRef::parse("nginx:latest").unwrap()));
        assert!(!all[1].runs(&ImageRef::parse("nginx:1").unwrap()));

        assert!(all[2].init && all[2].digest_pinned());
        assert_eq!(all[2].image, Some("gcr.io/p/app:v1"));
        assert_eq!(all[2].spelled(), Some(pinned.as_str()));

        assert_eq!(all[3].image, None, "no tag: not indexed");
        assert_eq!(all[3].unindexed(), Some(by_hand.as_str()));
        assert_eq!(all[3].pull_policy, Some(PullPolicy::Never));

        assert_eq!(all[4].container, "", "an empty name is a name");
        assert_eq!(all[4].unindexed(), Some("bad image!"));
        assert_eq!(packed.get(4), Some(all[4]));
        assert_eq!(packed.get(5), None);
    }

    #[test]
    fn none_is_not_an_empty_string() {
        let packed: Containers = vec![ContainerImage {
            container: "c".into(),
            init: false,
            image: None,
            pull_policy: None,
            written: Some("".into()),
        }]
        .into();
        let c = packed.get(0).unwrap();
        assert_eq!(c.image, None);
        assert_eq!(c.spelled(), Some(""));
        assert!(Containers::default().is_empty());
    }
}
