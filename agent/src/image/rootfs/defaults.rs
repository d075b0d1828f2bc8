//! The image's exec defaults: environment, working directory and user from an OCI config.
//!
//! User names are resolved when the image is built, against the final tree's /etc/passwd
//! and /etc/group, with docker's rules, so the guest never has to parse those files and a
//! name that does not exist is an error now rather than at the first exec.

use serde::{Deserialize, Serialize};

use super::path::{EntryName, EntryPath};
use super::spool::Spool;
use super::tree::{Node, Tree};
use super::RootfsError;

/// Largest /etc/passwd or /etc/group we read.
const MAX_ETC_FILE: u64 = 4 << 20;

/// How commands run by default in a sandbox made from the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    /// `KEY=VALUE` pairs, in the config's order.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// An absolute path.
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub user: Option<UserId>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserId {
    pub uid: u32,
    pub gid: u32,
}

/// The config's settings as written, checked when the tree is final.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImageConfigDefaults {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

/// Checks the config's settings and resolves its user against the image.
pub fn resolve(
    config: &ImageConfigDefaults,
    tree: &Tree,
    spool: &Spool,
) -> Result<ExecDefaults, RootfsError> {
    let env = config
        .env
        .iter()
        .map(|entry| parse_env(entry))
        .collect::<Result<_, _>>()?;
    let cwd = match config.working_dir.as_deref() {
        None | Some("") => None,
        Some(dir) => Some(parse_working_dir(dir)?),
    };
    let user = match config.user.as_deref() {
        None | Some("") => None,
        Some(user) => Some(resolve_user(user, &EtcFiles { tree, spool })?),
    };
    Ok(ExecDefaults { env, cwd, user })
}

fn refuse(field: &'static str, value: &str, problem: impl Into<String>) -> RootfsError {
    RootfsError::Defaults {
        field,
        value: EntryName::new(value.as_bytes()),
        problem: problem.into(),
    }
}

fn parse_env(entry: &str) -> Result<(String, String), RootfsError> {
    if entry.contains('\0') {
        return Err(refuse("Env", entry, "contains a NUL byte"));
    }
    match entry.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        Some(_) => Err(refuse(
            "Env",
            entry,
            "has an empty name; entries are KEY=VALUE",
        )),
        None => Err(refuse("Env", entry, "has no '='; entries are KEY=VALUE")),
    }
}

fn parse_working_dir(dir: &str) -> Result<String, RootfsError> {
    if dir.contains('\0') {
        return Err(refuse("WorkingDir", dir, "contains a NUL byte"));
    }
    if !dir.starts_with('/') {
        return Err(refuse("WorkingDir", dir, "must be an absolute path"));
    }
    Ok(dir.to_owned())
}

/// Resolves "uid", "uid:gid", "name", "name:group", "uid:group" or "name:gid" as docker
/// does: a uid alone takes its primary group from /etc/passwd, or 0 if it is not listed.
fn resolve_user(spec: &str, etc: &EtcFiles<'_>) -> Result<UserId, RootfsError> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(refuse("User", spec, "expected USER[:GROUP]"));
    }
    let (uid, primary_gid) = match numeric(user) {
        Some(uid) => {
            let uid = uid.ok_or_else(|| refuse("User", spec, "the uid does not fit in 32 bits"))?;
            let listed = etc.passwd(spec)?.into_iter().find(|u| u.uid == uid);
            (uid, listed.map_or(0, |u| u.gid))
        }
        None => {
            let entry = etc
                .passwd(spec)?
                .into_iter()
                .find(|u| u.name == user)
                .ok_or_else(|| {
                    refuse(
                        "User",
                        spec,
                        format!("the image's /etc/passwd has no user {user:?}; use a numeric uid or add the user"),
                    )
                })?;
            (entry.uid, entry.gid)
        }
    };
    let gid = match group.map(|g| (g, numeric(g))) {
        None => primary_gid,
        Some((_, Some(Some(gid)))) => gid,
        Some((_, Some(None))) => {
            return Err(refuse("User", spec, "the gid does not fit in 32 bits"))
        }
        Some((name, None)) => etc
            .group(spec)?
            .into_iter()
            .find(|g| g.name == name)
            .map(|g| g.id)
            .ok_or_else(|| {
                refuse(
                    "User",
                    spec,
                    format!("the image's /etc/group has no group {name:?}; use a numeric gid or add the group"),
                )
            })?,
    };
    Ok(UserId { uid, gid })
}

/// `Some(Some(n))` for a number, `Some(None)` for digits that overflow, `None` for a name.
fn numeric(s: &str) -> Option<Option<u32>> {
    if s.bytes().all(|b| b.is_ascii_digit()) {
        Some(s.parse().ok())
    } else {
        None
    }
}

#[derive(Debug)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
}

#[derive(Debug)]
struct GroupEntry {
    name: String,
    id: u32,
}

/// The image's /etc/passwd and /etc/group, read from the spool when a name needs them.
struct EtcFiles<'a> {
    tree: &'a Tree,
    spool: &'a Spool,
}

impl EtcFiles<'_> {
    fn passwd(&self, spec: &str) -> Result<Vec<PasswdEntry>, RootfsError> {
        let text = self.read("etc/passwd", spec)?;
        Ok(records(&text, 7)
            .filter_map(|f| {
                Some(PasswdEntry {
                    name: f[0].to_owned(),
                    uid: f[2].parse().ok()?,
                    gid: f[3].parse().ok()?,
                })
            })
            .collect())
    }

    fn group(&self, spec: &str) -> Result<Vec<GroupEntry>, RootfsError> {
        let text = self.read("etc/group", spec)?;
        Ok(records(&text, 4)
            .filter_map(|f| {
                Some(GroupEntry {
                    name: f[0].to_owned(),
                    id: f[2].parse().ok()?,
                })
            })
            .collect())
    }

    /// The file's text; empty if the image has no such regular file.
    fn read(&self, path: &str, spec: &str) -> Result<String, RootfsError> {
        let path = EntryPath::parse(path.as_bytes()).expect("a constant path");
        let Some(Node::File { extent, .. }) = self.tree.resolve(&path) else {
            return Ok(String::new());
        };
        let bytes = self
            .spool
            .read(*extent, MAX_ETC_FILE)
            .map_err(|e| RootfsError::Spool(std::io::Error::other(e.to_string())))?
            .ok_or_else(|| {
                refuse(
                    "User",
                    spec,
                    format!(
                        "/{} is over {MAX_ETC_FILE} bytes; use numeric ids",
                        EntryName::from(&path).as_str()
                    ),
                )
            })?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The colon-separated fields of each line with at least `min_fields` of them.
fn records(text: &str, min_fields: usize) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(move |fields| fields.len() >= min_fields)
}

#[cfg(test)]
mod tests {
    use super::super::spool::Extent;
    use super::super::tree::Meta;
    use super::super::Limits;
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\nbroken line\nbad:x:notanumber:1:::\n";
    const GROUP: &[u8] = b"root:x:0:\nstaff:x:50:app\n";

    fn image(passwd: Option<&[u8]>) -> (Tree, Spool) {
        let mut spool = Spool::new_in(&std::env::temp_dir()).unwrap();
        let mut tree = Tree::new(&Limits::default());
        let mut add = |path: &str, bytes: &[u8]| {
            let extent: Extent = spool.append_bytes(bytes).unwrap();
            tree.insert_file(
                EntryPath::parse(path.as_bytes()).unwrap(),
                Meta::new(0o644, 0, 0, 0),
                extent,
            )
            .unwrap();
        };
        if let Some(passwd) = passwd {
            add("etc/passwd", passwd);
        }
        add("etc/group", GROUP);
        (tree, spool)
    }

    fn user(spec: &str, passwd: Option<&[u8]>) -> Result<UserId, RootfsError> {
        let (tree, spool) = image(passwd);
        resolve_user(
            spec,
            &EtcFiles {
                tree: &tree,
                spool: &spool,
            },
        )
    }

    fn id(uid: u32, gid: u32) -> Result<UserId, String> {
        Ok(UserId { uid, gid })
    }

    #[test]
    fn bad_users_are_refused_naming_them() {
        for spec in [
            "nobody",
            "app:nogroup",
            "99999999999",
            "1:99999999999",
            ":",
            "app:",
            ":0",
        ] {
            let err = user(spec, Some(PASSWD)).unwrap_err().to_string();
            assert!(err.contains(&format!("\"{spec}\"")), "{spec}: {err}");
        }
        // Without a passwd file, names cannot resolve; numbers still do.
        assert!(user("app", None).is_err());
        assert_eq!(user("7", None).map_err(|e| e.to_string()), id(7, 0));
    }

    #[test]
    fn users_resolve_with_dockers_rules() {
        let ok = |spec| user(spec, Some(PASSWD)).map_err(|e| e.to_string());
        assert_eq!(ok("app"), id(1000, 1001));
        assert_eq!(ok("1000"), id(1000, 1001));
        assert_eq!(ok("4242"), id(4242, 0));
        assert_eq!(ok("1000:7"), id(1000, 7));
        assert_eq!(ok("app:staff"), id(1000, 50));
        assert_eq!(ok("0:staff"), id(0, 50));
        assert_eq!(ok("app:0"), id(1000, 0));
    }

    #[test]
    fn env_and_workdir_are_checked() {
        let (tree, spool) = image(None);
        let config = |env: &[&str], dir: Option<&str>| ImageConfigDefaults {
            env: env.iter().map(|s| s.to_string()).collect(),
            working_dir: dir.map(str::to_owned),
            user: None,
        };
        for bad in ["NOEQUALS", "=value", "A=\0"] {
            let err = resolve(&config(&[bad], None), &tree, &spool).unwrap_err();
            assert!(err.to_string().contains("Env"), "{err}");
        }
        let err = resolve(&config(&[], Some("relative")), &tree, &spool).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        let got = resolve(
            &config(&["A=1", "B=x=y", "C="], Some("/srv")),
            &tree,
            &spool,
        )
        .unwrap();
        assert_eq!(
            got.env,
            vec![
                ("A".into(), "1".into()),
                ("B".into(), "x=y".into()),
                ("C".into(), String::new())
            ]
        );
        assert_eq!(got.cwd.as_deref(), Some("/srv"));
        assert_eq!(
            resolve(&config(&[], Some("")), &tree, &spool).unwrap(),
            ExecDefaults::default()
        );
    }

    #[test]
    fn defaults_serialise_and_missing_fields_default() {
        let d: ExecDefaults = serde_json::from_str("{}").unwrap();
        assert_eq!(d, ExecDefaults::default());
        let d = ExecDefaults {
            env: vec![("A".into(), "1".into())],
            cwd: Some("/".into()),
            user: Some(UserId { uid: 1, gid: 2 }),
        };
        let back: ExecDefaults = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }
}
