//! The image as a tree of checked entries, and how layers change it.
//!
//! Keys are [`EntryPath`]s, so a directory is followed directly by its subtree: removing a
//! subtree is removing one contiguous range, and iterating the map is the archive order.
//! Nothing here follows a symlink when writing: an entry below a non-directory is refused
//! (the symlink escape), never resolved.

use std::collections::BTreeMap;

use super::path::{EntryName, EntryPath};
use super::spool::Extent;
use super::{Limits, RootfsError};

/// Room in the tree beyond `max_entries` for what the builder adds itself (/init, /dev,
/// /dev/console, the root).
const RESERVED_NODES: u64 = 16;

/// Symlinks followed when looking a file up (e.g. /etc/passwd), as the kernel's 40 but
/// smaller: this is a convenience, not a resolver.
const MAX_HOPS: usize = 8;

/// Ownership, permissions and time of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, setuid/setgid/sticky included; never the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: u64,
}

impl Meta {
    /// What implicit directories get: 0755 root:root, mtime 0.
    pub const DIR: Meta = Meta {
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime: 0,
    };

    pub fn new(mode: u32, uid: u32, gid: u32, mtime: u64) -> Self {
        Self {
            mode: mode & 0o7777,
            uid,
            gid,
            mtime,
        }
    }
}

/// One entry of the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir {
        meta: Meta,
    },
    /// A regular file. Hard links are nodes sharing one `inode` (and so one meta and one
    /// extent); the archive writer gives them one inode number, so the guest kernel links
    /// them.
    File {
        meta: Meta,
        extent: Extent,
        inode: u64,
    },
    Symlink {
        meta: Meta,
        target: Box<[u8]>,
    },
    /// Only ever /dev/console, added by the builder: device nodes from the input are
    /// refused before they reach the tree.
    CharDevice {
        meta: Meta,
        major: u32,
        minor: u32,
    },
}

impl Node {
    /// What kind of entry this is, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Dir { .. } => "directory",
            Node::File { .. } => "regular file",
            Node::Symlink { .. } => "symlink",
            Node::CharDevice { .. } => "character device",
        }
    }

    fn name_bytes(&self) -> u64 {
        match self {
            Node::Symlink { target, .. } => target.len() as u64,
            _ => 0,
        }
    }
}

/// One entry of a layer, checked but not yet in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir(Meta),
    File(Meta, Extent),
    Symlink(Meta, Box<[u8]>),
    /// A hard link to the file at this path.
    HardLink(EntryPath),
    /// OCI whiteout: delete this path and its subtree from the lower layers.
    Whiteout,
    /// OCI opaque directory: delete this directory's children from the lower layers.
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerEntry {
    pub path: EntryPath,
    pub kind: EntryKind,
}

/// A batch of entries applied to the tree as one: a tarball, a directory or an OCI layer.
/// A layer is read in full (and, for OCI, its digest checked) before it is applied.
#[derive(Debug, Default)]
pub struct Layer {
    pub entries: Vec<LayerEntry>,
}

impl Layer {
    pub fn push(&mut self, path: EntryPath, kind: EntryKind) {
        self.entries.push(LayerEntry { path, kind });
    }
}

pub struct Tree {
    nodes: BTreeMap<EntryPath, Node>,
    next_inode: u64,
    max_nodes: u64,
    max_name_bytes: u64,
    /// Bytes of keys and symlink targets now in the tree.
    name_bytes: u64,
}

impl Tree {
    /// An empty root directory, 0755 root:root.
    pub fn new(limits: &Limits) -> Self {
        let mut nodes = BTreeMap::new();
        nodes.insert(EntryPath::root(), Node::Dir { meta: Meta::DIR });
        Self {
            nodes,
            next_inode: 0,
            max_nodes: limits.max_entries.saturating_add(RESERVED_NODES),
            max_name_bytes: limits.max_name_bytes,
            name_bytes: 0,
        }
    }

    pub fn get(&self, path: &EntryPath) -> Option<&Node> {
        self.nodes.get(path)
    }

    /// Every entry, root first, each directory directly followed by its subtree.
    pub fn iter(&self) -> impl Iterator<Item = (&EntryPath, &Node)> {
        self.nodes.iter()
    }

    /// Applies a layer: first its whiteouts to what is already there (the lower layers),
    /// then its entries in order, a later entry replacing an earlier one.
    pub fn apply(&mut self, layer: Layer) -> Result<(), RootfsError> {
        for entry in &layer.entries {
            match entry.kind {
                EntryKind::Whiteout => self.remove(&entry.path),
                EntryKind::Opaque => self.clear_dir(&entry.path),
                _ => {}
            }
        }
        for LayerEntry { path, kind } in layer.entries {
            match kind {
                EntryKind::Dir(meta) => self.insert(path, Node::Dir { meta })?,
                EntryKind::File(meta, extent) => self.insert_file(path, meta, extent)?,
                EntryKind::Symlink(meta, target) => {
                    self.insert(path, Node::Symlink { meta, target })?
                }
                EntryKind::HardLink(target) => self.link(path, &target)?,
                EntryKind::Whiteout | EntryKind::Opaque => {}
            }
        }
        Ok(())
    }

    /// A new regular file (its own inode).
    pub fn insert_file(
        &mut self,
        path: EntryPath,
        meta: Meta,
        extent: Extent,
    ) -> Result<(), RootfsError> {
        self.next_inode = self.next_inode.saturating_add(1);
        let inode = self.next_inode;
        self.insert(
            path,
            Node::File {
                meta,
                extent,
                inode,
            },
        )
    }

    /// A hard link at `path` to the regular file at `target`.
    pub fn link(&mut self, path: EntryPath, target: &EntryPath) -> Result<(), RootfsError> {
        match self.nodes.get(target) {
            Some(node @ Node::File { .. }) => {
                let node = node.clone();
                self.insert(path, node)
            }
            _ => Err(RootfsError::HardLink {
                entry: EntryName::from(&path),
                target: EntryName::from(target),
            }),
        }
    }

    /// Puts `node` at `path`, creating missing parents as 0755 root:root directories.
    /// A directory over a directory only changes its meta (the children stay); anything
    /// else replaces what was there, a directory's subtree included. Refused when a parent
    /// is not a directory.
    pub fn insert(&mut self, path: EntryPath, node: Node) -> Result<(), RootfsError> {
        if path.is_root() {
            return self.set_root(node);
        }
        self.make_parents(&path)?;
        let taken = match (self.nodes.get_mut(&path), &node) {
            (Some(Node::Dir { meta: old }), Node::Dir { meta }) => {
                *old = *meta;
                return Ok(());
            }
            (existing, _) => existing.is_some(),
        };
        if taken {
            self.remove(&path);
        }
        self.add(path, node)
    }

    fn set_root(&mut self, node: Node) -> Result<(), RootfsError> {
        match node {
            Node::Dir { meta } => {
                self.nodes.insert(EntryPath::root(), Node::Dir { meta });
                Ok(())
            }
            other => Err(RootfsError::RootNotDir {
                entry: EntryName::from(&EntryPath::root()),
                kind: other.kind(),
            }),
        }
    }

    fn make_parents(&mut self, path: &EntryPath) -> Result<(), RootfsError> {
        for parent in path.ancestors() {
            match self.nodes.get(&parent) {
                Some(Node::Dir { .. }) => {}
                Some(other) => {
                    return Err(RootfsError::ParentNotDir {
                        entry: EntryName::from(path),
                        parent: EntryName::from(&parent),
                        kind: other.kind(),
                    })
                }
                None => self.add(parent, Node::Dir { meta: Meta::DIR })?,
            }
        }
        Ok(())
    }

    /// Adds a node at a free path, within the limits.
    fn add(&mut self, path: EntryPath, node: Node) -> Result<(), RootfsError> {
        if self.nodes.len() as u64 >= self.max_nodes {
            return Err(RootfsError::TooManyEntries {
                entry: EntryName::from(&path),
                limit: self.max_nodes.saturating_sub(RESERVED_NODES),
            });
        }
        let bytes = (path.as_bytes().len() as u64).saturating_add(node.name_bytes());
        let total = self.name_bytes.saturating_add(bytes);
        if total > self.max_name_bytes {
            return Err(RootfsError::NamesTooLarge {
                entry: EntryName::from(&path),
                limit: self.max_name_bytes,
            });
        }
        self.name_bytes = total;
        self.nodes.insert(path, node);
        Ok(())
    }

    /// Removes `path` and everything below it; for the root, everything but the root.
    pub fn remove(&mut self, path: &EntryPath) {
        self.remove_below(path, !path.is_root());
    }

    /// Removes everything below `dir`, keeping `dir` itself.
    pub fn clear_dir(&mut self, dir: &EntryPath) {
        self.remove_below(dir, false);
    }

    fn remove_below(&mut self, path: &EntryPath, including: bool) {
        let doomed: Vec<EntryPath> = self
            .nodes
            .range(path..)
            .take_while(|(key, _)| path.contains(key))
            .filter(|(key, _)| including || *key != path)
            .map(|(key, _)| key.clone())
            .collect();
        for key in doomed {
            if let Some(node) = self.nodes.remove(&key) {
                let bytes = (key.as_bytes().len() as u64).saturating_add(node.name_bytes());
                self.name_bytes = self.name_bytes.saturating_sub(bytes);
            }
        }
    }

    /// Looks `path` up the way the guest would open it, following symlinks (at most a few)
    /// in every component; `None` if it does not resolve. Used to read /etc/passwd.
    pub fn resolve(&self, path: &EntryPath) -> Option<&Node> {
        let mut pending: Vec<Vec<u8>> = components_reversed(path.as_bytes());
        let mut at = EntryPath::root();
        let mut hops = 0;
        while let Some(component) = pending.pop() {
            match component.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    at = at.parent().unwrap_or_else(EntryPath::root);
                    continue;
                }
                _ => {}
            }
            let next = at.join(&component).ok()?;
            match self.nodes.get(&next)? {
                Node::Dir { .. } => at = next,
                Node::Symlink { target, .. } => {
                    hops += 1;
                    if hops > MAX_HOPS {
                        return None;
                    }
                    if target.first() == Some(&b'/') {
                        at = EntryPath::root();
                    }
                    pending.extend(components_reversed(target));
                }
                node => {
                    return if pending.iter().all(|c| c.is_empty() || c == b".") {
                        Some(node)
                    } else {
                        None
                    }
                }
            }
        }
        self.nodes.get(&at)
    }
}

fn components_reversed(path: &[u8]) -> Vec<Vec<u8>> {
    path.split(|&b| b == b'/')
        .rev()
        .map(<[u8]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> EntryPath {
        EntryPath::parse(s.as_bytes()).unwrap()
    }

    fn tree() -> Tree {
        Tree::new(&Limits::default())
    }

    fn file(t: &mut Tree, path: &str) {
        let extent = Extent { offset: 0, len: 0 };
        t.insert_file(p(path), Meta::new(0o644, 0, 0, 0), extent)
            .unwrap();
    }

    fn symlink(target: &str) -> Node {
        Node::Symlink {
            meta: Meta::new(0o777, 0, 0, 0),
            target: target.as_bytes().into(),
        }
    }

    fn paths(t: &Tree) -> Vec<String> {
        t.iter()
            .map(|(k, _)| String::from_utf8_lossy(k.as_bytes()).into_owned())
            .collect()
    }

    #[test]
    fn writing_through_a_symlink_is_refused() {
        let mut t = tree();
        t.insert(p("a"), symlink("/etc")).unwrap();
        let err = t
            .insert_file(p("a/x"), Meta::DIR, Extent { offset: 0, len: 0 })
            .unwrap_err();
        assert!(matches!(err, RootfsError::ParentNotDir { .. }), "{err}");
        assert!(err.to_string().contains("\"a/x\""), "{err}");
        assert!(err.to_string().contains("symlink"), "{err}");
        file(&mut t, "f");
        assert!(t.insert(p("f/g"), Node::Dir { meta: Meta::DIR }).is_err());
    }

    #[test]
    fn parents_are_created_and_a_non_directory_replaces_a_subtree() {
        let mut t = tree();
        file(&mut t, "a/b/c");
        file(&mut t, "a-b");
        assert_eq!(paths(&t), vec!["", "a", "a/b", "a/b/c", "a-b"]);
        assert_eq!(t.get(&p("a/b")), Some(&Node::Dir { meta: Meta::DIR }));
        t.insert(p("a"), symlink("x")).unwrap();
        assert_eq!(paths(&t), vec!["", "a", "a-b"]);
        // A directory over a directory keeps the children.
        file(&mut t, "d/x");
        let meta = Meta::new(0o700, 1, 2, 3);
        t.insert(p("d"), Node::Dir { meta }).unwrap();
        assert_eq!(t.get(&p("d")), Some(&Node::Dir { meta }));
        assert!(t.get(&p("d/x")).is_some());
    }

    #[test]
    fn the_root_must_stay_a_directory() {
        let mut t = tree();
        let meta = Meta::new(0o700, 0, 0, 9);
        t.insert(EntryPath::root(), Node::Dir { meta }).unwrap();
        assert_eq!(t.get(&EntryPath::root()), Some(&Node::Dir { meta }));
        let err = t.insert(EntryPath::root(), symlink("x")).unwrap_err();
        assert!(matches!(err, RootfsError::RootNotDir { .. }), "{err}");
        t.remove(&EntryPath::root());
        assert!(t.get(&EntryPath::root()).is_some());
    }

    #[test]
    fn hard_links_need_an_earlier_regular_file() {
        let mut t = tree();
        let err = t.link(p("l"), &p("missing")).unwrap_err();
        assert!(matches!(err, RootfsError::HardLink { .. }), "{err}");
        assert!(err.to_string().contains("\"missing\""), "{err}");
        t.insert(p("s"), symlink("x")).unwrap();
        assert!(t.link(p("l"), &p("s")).is_err());
        t.insert(p("d"), Node::Dir { meta: Meta::DIR }).unwrap();
        assert!(t.link(p("l"), &p("d")).is_err());
        file(&mut t, "f");
        t.link(p("l"), &p("f")).unwrap();
        assert_eq!(t.get(&p("l")), t.get(&p("f")));
    }

    fn layer(entries: Vec<(&str, EntryKind)>) -> Layer {
        let mut l = Layer::default();
        for (path, kind) in entries {
            l.push(p(path), kind);
        }
        l
    }

    fn f() -> EntryKind {
        EntryKind::File(Meta::new(0o644, 0, 0, 0), Extent { offset: 0, len: 0 })
    }

    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let mut t = tree();
        t.apply(layer(vec![
            ("etc/a", f()),
            ("etc/b", f()),
            ("opt/x/y", f()),
            ("gone/z", f()),
        ]))
        .unwrap();
        t.apply(layer(vec![
            // An opaque marker listed after a sibling: the sibling (this layer) survives.
            ("etc/new", f()),
            ("etc", EntryKind::Opaque),
            ("gone", EntryKind::Whiteout),
            // A whiteout and a new entry of the same name in one layer: the new one stays.
            ("opt/x", EntryKind::Whiteout),
            ("opt/x", EntryKind::Dir(Meta::DIR)),
            ("nothing/here", EntryKind::Whiteout),
        ]))
        .unwrap();
        assert_eq!(paths(&t), vec!["", "etc", "etc/new", "opt", "opt/x"]);
    }

    #[test]
    fn the_node_limit_counts_implicit_parents() {
        let limits = Limits {
            max_entries: 2,
            ..Limits::default()
        };
        let mut t = Tree::new(&limits);
        let deep = (0..40).map(|_| "d").collect::<Vec<_>>().join("/");
        let err = t
            .insert(p(&deep), Node::Dir { meta: Meta::DIR })
            .unwrap_err();
        assert!(matches!(err, RootfsError::TooManyEntries { .. }), "{err}");
        let limits = Limits {
            max_name_bytes: 10,
            ..Limits::default()
        };
        let mut t = Tree::new(&limits);
        let err = t.insert(p("a"), symlink("0123456789")).unwrap_err();
        assert!(matches!(err, RootfsError::NamesTooLarge { .. }), "{err}");
    }

    #[test]
    fn resolve_follows_a_few_symlinks() {
        let mut t = tree();
        file(&mut t, "real/passwd");
        t.insert(p("etc"), symlink("real")).unwrap();
        t.insert(p("real/link"), symlink("../real/./passwd"))
            .unwrap();
        t.insert(p("abs"), symlink("/real/link")).unwrap();
        t.insert(p("loop"), symlink("loop")).unwrap();
        for path in ["real/passwd", "etc/passwd", "real/link", "abs"] {
            assert!(
                matches!(t.resolve(&p(path)), Some(Node::File { .. })),
                "{path}"
            );
        }
        assert_eq!(t.resolve(&p("loop")), None);
        assert_eq!(t.resolve(&p("real/passwd/x")), None);
        assert_eq!(t.resolve(&p("missing")), None);
    }
}
