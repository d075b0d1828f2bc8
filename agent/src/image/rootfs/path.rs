//! Entry paths: the one place a name from the input becomes a path in the tree.
//!
//! Everything past [`EntryPath::parse`] holds a normalised relative path: no empty, "." or
//! ".." components, no NUL, at most [`MAX_PATH`] bytes. Nothing here touches the host
//! filesystem; a path only ever names a node of the in-memory tree.

use std::cmp::Ordering;
use std::fmt;

/// Longest path (and symlink target) we accept, as Linux's PATH_MAX.
pub const MAX_PATH: usize = 4096;

/// Longest name we print in an error, in characters.
const SHOWN_CHARS: usize = 200;

/// Why a name is not an acceptable path; each says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty name; every entry needs a name")]
    Empty,
    #[error("the name contains a NUL byte")]
    Nul,
    #[error("absolute path; entries must be relative to the root (create the tarball with `tar -C ROOT .`)")]
    Absolute,
    #[error("the path has a `..` component, which could climb out of the root; remove the entry or give its real path")]
    DotDot,
    #[error("the path is {0} bytes, longer than the {MAX_PATH}-byte limit")]
    TooLong(usize),
    #[error("{0:?} is not a valid file name")]
    BadComponent(String),
}

/// Why a symlink target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("empty symlink target")]
    Empty,
    #[error("the target contains a NUL byte")]
    Nul,
    #[error("the target is {0} bytes, longer than the {MAX_PATH}-byte limit")]
    TooLong(usize),
    #[error("the relative target climbs above the root; use an absolute target (it resolves inside the guest) or fix the link")]
    Escapes,
}

/// A normalised path relative to the root; the root itself is the empty path.
///
/// Stored joined with '/', but ordered component by component, so that a directory sorts
/// immediately before its children: "a" < "a/x" < "a-b". Plain byte order would put "a-b"
/// between "a" and "a/x" ('-' < '/'), splitting a directory from its subtree; mapping '/'
/// below every other byte gives the component-wise order without splitting the string.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EntryPath(Box<[u8]>);

impl EntryPath {
    pub fn root() -> Self {
        Self(Box::default())
    }

    /// Parses a name as found in a tar header or built by the directory walk: a leading
    /// "./", repeated and trailing slashes are fine; "." alone (or "./") is the root.
    pub fn parse(raw: &[u8]) -> Result<Self, PathError> {
        if raw.is_empty() {
            return Err(PathError::Empty);
        }
        if raw.contains(&0) {
            return Err(PathError::Nul);
        }
        if raw.len() > MAX_PATH {
            return Err(PathError::TooLong(raw.len()));
        }
        if raw[0] == b'/' {
            return Err(PathError::Absolute);
        }
        let mut joined = Vec::with_capacity(raw.len());
        for component in raw.split(|&b| b == b'/') {
            match component {
                b"" | b"." => {}
                b".." => return Err(PathError::DotDot),
                name => {
                    if !joined.is_empty() {
                        joined.push(b'/');
                    }
                    joined.extend_from_slice(name);
                }
            }
        }
        Ok(Self(joined.into_boxed_slice()))
    }

    /// This path with one more component; `name` must be a plain file name.
    pub fn join(&self, name: &[u8]) -> Result<Self, PathError> {
        check_component(name)?;
        let mut joined = Vec::with_capacity(self.0.len() + 1 + name.len());
        joined.extend_from_slice(&self.0);
        if !joined.is_empty() {
            joined.push(b'/');
        }
        joined.extend_from_slice(name);
        if joined.len() > MAX_PATH {
            return Err(PathError::TooLong(joined.len()));
        }
        Ok(Self(joined.into_boxed_slice()))
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The joined bytes, without a leading slash; empty for the root.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The parent directory; `None` for the root.
    pub fn parent(&self) -> Option<Self> {
        if self.is_root() {
            return None;
        }
        let end = self.0.iter().rposition(|&b| b == b'/').unwrap_or(0);
        Some(Self(self.0[..end].into()))
    }

    /// The last component; `None` for the root.
    pub fn file_name(&self) -> Option<&[u8]> {
        if self.is_root() {
            return None;
        }
        let start = self.0.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        Some(&self.0[start..])
    }

    /// How many components: 0 for the root.
    pub fn depth(&self) -> usize {
        if self.is_root() {
            0
        } else {
            1 + self.0.iter().filter(|&&b| b == b'/').count()
        }
    }

    /// Every proper ancestor except the root, outermost first: "a/b/c" gives "a", "a/b".
    pub fn ancestors(&self) -> impl Iterator<Item = EntryPath> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .map(|(i, _)| Self(self.0[..i].into()))
    }

    /// Whether `other` is this path or lies below it.
    pub fn contains(&self, other: &EntryPath) -> bool {
        if self.is_root() {
            return true;
        }
        other.0.starts_with(&self.0)
            && (other.0.len() == self.0.len() || other.0.get(self.0.len()) == Some(&b'/'))
    }
}

/// A single file name: not empty, ".", "..", and without '/' or NUL.
pub fn check_component(name: &[u8]) -> Result<(), PathError> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(PathError::BadComponent(EntryName::new(name).0));
    }
    if name.contains(&0) {
        return Err(PathError::Nul);
    }
    Ok(())
}

/// Checks a symlink's target. Absolute targets are fine: the guest kernel resolves them
/// inside the guest's root. A relative target may not climb above the root, counting
/// from the link's own directory.
pub fn check_symlink_target(link: &EntryPath, target: &[u8]) -> Result<(), TargetError> {
    if target.is_empty() {
        return Err(TargetError::Empty);
    }
    if target.contains(&0) {
        return Err(TargetError::Nul);
    }
    if target.len() > MAX_PATH {
        return Err(TargetError::TooLong(target.len()));
    }
    if target[0] == b'/' {
        return Ok(());
    }
    // The link's directory is one level above the link itself.
    let mut depth = link.depth().saturating_sub(1);
    for component in target.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => depth = depth.checked_sub(1).ok_or(TargetError::Escapes)?,
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Maps '/' below every other byte, so joined paths compare component by component.
fn order_key(b: u8) -> u16 {
    if b == b'/' {
        0
    } else {
        u16::from(b) + 1
    }
}

impl Ord for EntryPath {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0
            .iter()
            .map(|&b| order_key(b))
            .cmp(other.0.iter().map(|&b| order_key(b)))
    }
}

impl PartialOrd for EntryPath {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for EntryPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_root() {
            f.write_str("/")
        } else {
            write!(f, "{}", EntryName::new(&self.0))
        }
    }
}

impl fmt::Debug for EntryPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EntryPath({self})")
    }
}

/// A name from the input as we print it in errors: lossy UTF-8, control characters
/// escaped (a hostile name must not drive the user's terminal), at most ~200 characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName(String);

impl EntryName {
    pub fn new(raw: &[u8]) -> Self {
        let lossy = String::from_utf8_lossy(raw);
        let mut shown = String::new();
        for (i, c) in lossy.chars().enumerate() {
            if i == SHOWN_CHARS {
                shown.push('…');
                break;
            }
            if c.is_control() {
                shown.extend(c.escape_default());
            } else {
                shown.push(c);
            }
        }
        Self(shown)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&EntryPath> for EntryName {
    fn from(path: &EntryPath) -> Self {
        if path.is_root() {
            Self(".".into())
        } else {
            Self::new(path.as_bytes())
        }
    }
}

impl fmt::Display for EntryName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> EntryPath {
        EntryPath::parse(s.as_bytes()).unwrap()
    }

    #[test]
    fn hostile_names_are_refused() {
        assert_eq!(EntryPath::parse(b""), Err(PathError::Empty));
        assert_eq!(EntryPath::parse(b"/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(EntryPath::parse(b"/"), Err(PathError::Absolute));
        assert_eq!(EntryPath::parse(b".."), Err(PathError::DotDot));
        assert_eq!(EntryPath::parse(b"a/../../x"), Err(PathError::DotDot));
        assert_eq!(EntryPath::parse(b"./a/.."), Err(PathError::DotDot));
        assert_eq!(EntryPath::parse(b"a\0b"), Err(PathError::Nul));
        let long = vec![b'a'; MAX_PATH + 1];
        assert_eq!(
            EntryPath::parse(&long),
            Err(PathError::TooLong(MAX_PATH + 1))
        );
        assert!(EntryPath::parse(&long[..MAX_PATH]).is_ok());
    }

    #[test]
    fn names_are_normalised() {
        assert!(p(".").is_root());
        assert!(p("./").is_root());
        assert!(p(".//.").is_root());
        assert_eq!(p("./a//b/./c/").as_bytes(), b"a/b/c");
        assert_eq!(p("...").as_bytes(), b"...");
        assert_eq!(p("a/b").parent(), Some(p("a")));
        assert_eq!(p("a").parent(), Some(EntryPath::root()));
        assert_eq!(EntryPath::root().parent(), None);
        assert_eq!(p("a/bc").file_name(), Some(&b"bc"[..]));
        assert_eq!(p("a/b/c").depth(), 3);
        let ancestors: Vec<_> = p("a/b/c").ancestors().collect();
        assert_eq!(ancestors, vec![p("a"), p("a/b")]);
    }

    #[test]
    fn a_directory_sorts_immediately_before_its_children() {
        // Byte order of the joined strings would give "a", "a-b", "a/x" ('-' < '/').
        assert!(b"a-b".as_slice() < b"a/x".as_slice());
        let mut paths = [p("a-b"), p("a/x"), p("a"), p("a/x/y"), p("a0"), p("b")];
        paths.sort();
        let sorted: Vec<_> = paths.iter().map(|p| p.as_bytes()).collect();
        assert_eq!(
            sorted,
            vec![
                &b"a"[..],
                &b"a/x"[..],
                &b"a/x/y"[..],
                &b"a-b"[..],
                &b"a0"[..],
                &b"b"[..]
            ]
        );
        assert!(EntryPath::root() < p("a"));
    }

    #[test]
    fn contains_is_component_wise() {
        assert!(p("a").contains(&p("a/x")));
        assert!(p("a").contains(&p("a")));
        assert!(!p("a").contains(&p("a-b")));
        assert!(!p("a").contains(&p("ab")));
        assert!(EntryPath::root().contains(&p("a")));
    }

    #[test]
    fn join_takes_only_plain_names() {
        assert_eq!(p("a").join(b"b").unwrap(), p("a/b"));
        assert_eq!(EntryPath::root().join(b"b").unwrap(), p("b"));
        for bad in [&b""[..], b".", b"..", b"x/y"] {
            assert!(p("a").join(bad).is_err(), "{bad:?}");
        }
        assert_eq!(p("a").join(b"x\0"), Err(PathError::Nul));
    }

    #[test]
    fn symlink_targets_may_not_climb_above_the_root() {
        let link = p("usr/bin/sh");
        assert_eq!(check_symlink_target(&link, b"/bin/busybox"), Ok(()));
        assert_eq!(check_symlink_target(&link, b"../../bin/busybox"), Ok(()));
        assert_eq!(check_symlink_target(&link, b"busybox"), Ok(()));
        assert_eq!(
            check_symlink_target(&link, b"../../../etc"),
            Err(TargetError::Escapes)
        );
        // Down and back up again stays inside.
        assert_eq!(check_symlink_target(&link, b"x/../../../y"), Ok(()));
        assert_eq!(
            check_symlink_target(&p("a"), b".."),
            Err(TargetError::Escapes)
        );
        assert_eq!(check_symlink_target(&p("a"), b""), Err(TargetError::Empty));
        assert_eq!(check_symlink_target(&p("a"), b"x\0"), Err(TargetError::Nul));
        let long = vec![b'x'; MAX_PATH + 1];
        assert_eq!(
            check_symlink_target(&p("a"), &long),
            Err(TargetError::TooLong(MAX_PATH + 1))
        );
    }

    #[test]
    fn shown_names_are_escaped_and_truncated() {
        let shown = EntryName::new(b"a\x1b[31mb\n\xff").to_string();
        assert_eq!(shown, "\"a\\u{1b}[31mb\\n\u{fffd}\"");
        let long = EntryName::new(&[b'x'; 1000]);
        assert_eq!(long.as_str().chars().count(), SHOWN_CHARS + 1);
    }
}
