//! One exec's request: what the caller asked for over its image's exec defaults.
//!
//! The environment starts from the guest's default `PATH`, then the image's `Env`, then
//! the caller's `KEY=VALUE`s, each later one replacing an earlier one with the same key;
//! the working directory and user are the caller's if given, else the image's.

use std::ffi::OsString;
use std::path::PathBuf;

use cleave_guest::protocol::message::ExecUser;
use cleave_guest::protocol::ExecRequest;

use crate::image::rootfs::ExecDefaults;

/// What one exec asks for on top of its image's defaults.
#[derive(Debug, Clone, Default)]
pub struct ExecOptions {
    pub env: Vec<(OsString, OsString)>,
    pub cwd: Option<PathBuf>,
    pub user: Option<ExecUser>,
    pub stdin: bool,
    pub timeout_ms: Option<u64>,
}

/// The request for `argv` under `defaults`, with `opts` applied over them.
pub fn exec_request(
    defaults: &ExecDefaults,
    argv: Vec<OsString>,
    opts: ExecOptions,
) -> ExecRequest {
    let mut req = ExecRequest::new(argv);
    let image_env = defaults
        .env
        .iter()
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
    for (k, v) in image_env.chain(opts.env) {
        match req.env.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => req.env.push((k, v)),
        }
    }
    req.cwd = opts
        .cwd
        .or_else(|| defaults.cwd.as_ref().map(PathBuf::from));
    req.user = opts.user.or_else(|| {
        defaults.user.map(|u| ExecUser {
            uid: u.uid,
            gid: u.gid,
        })
    });
    req.stdin = opts.stdin;
    req.timeout_ms = opts.timeout_ms;
    req
}

/// `KEY=VALUE` → its parts (an empty value is fine; an empty key is not).
pub fn parse_env(kv: &str) -> Result<(OsString, OsString), String> {
    match kv.split_once('=') {
        Some((k, v)) if !k.is_empty() && !kv.contains('\0') => {
            Ok((OsString::from(k), OsString::from(v)))
        }
        _ => Err(format!(
            "{:?} is not KEY=VALUE",
            kv.chars().take(80).collect::<String>()
        )),
    }
}

/// `UID:GID` (numbers: names are resolved when an image is built, against its own
/// `/etc/passwd`, not here).
pub fn parse_user(s: &str) -> Result<ExecUser, String> {
    let bad = || {
        format!(
            "{:?} is not UID:GID (two numbers, e.g. 1000:1000)",
            s.chars().take(80).collect::<String>()
        )
    };
    let (u, g) = s.split_once(':').ok_or_else(bad)?;
    let num = |x: &str| {
        (!x.is_empty() && x.bytes().all(|b| b.is_ascii_digit()))
            .then(|| x.parse::<u32>().ok())
            .flatten()
            .ok_or_else(bad)
    };
    Ok(ExecUser {
        uid: num(u)?,
        gid: num(g)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::rootfs::UserId;
    use cleave_guest::protocol::DEFAULT_PATH;

    fn env_of(req: &ExecRequest) -> Vec<(String, String)> {
        req.env
            .iter()
            .map(|(k, v)| (k.to_string_lossy().into(), v.to_string_lossy().into()))
            .collect()
    }

    #[test]
    fn the_caller_wins_over_the_image_and_the_image_over_the_guest() {
        let defaults = ExecDefaults {
            env: vec![
                ("PATH".into(), "/opt/py/bin:/usr/bin".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ],
            cwd: Some("/srv".into()),
            user: Some(UserId {
                uid: 1000,
                gid: 1000,
            }),
        };
        let req = exec_request(&defaults, vec!["python3".into()], ExecOptions::default());
        assert_eq!(
            env_of(&req),
            [
                ("PATH".to_string(), "/opt/py/bin:/usr/bin".to_string()),
                ("LANG".into(), "C.UTF-8".into())
            ]
        );
        assert_eq!(req.cwd, Some(PathBuf::from("/srv")));
        assert_eq!(
            req.user,
            Some(ExecUser {
                uid: 1000,
                gid: 1000
            })
        );

        let opts = ExecOptions {
            env: vec![parse_env("LANG=C").unwrap(), parse_env("X=").unwrap()],
            cwd: Some("/tmp".into()),
            user: Some(parse_user("0:0").unwrap()),
            ..ExecOptions::default()
        };
        let req = exec_request(&defaults, vec!["id".into()], opts);
        assert_eq!(env_of(&req)[1], ("LANG".into(), "C".into()));
        assert_eq!(env_of(&req)[2], ("X".into(), String::new()));
        assert_eq!(req.cwd, Some(PathBuf::from("/tmp")));
        assert_eq!(req.user, Some(ExecUser { uid: 0, gid: 0 }));
    }

    #[test]
    fn without_an_image_a_command_gets_the_default_path_only() {
        let req = exec_request(
            &ExecDefaults::default(),
            vec!["true".into()],
            ExecOptions::default(),
        );
        assert_eq!(
            env_of(&req),
            [("PATH".to_string(), DEFAULT_PATH.to_string())]
        );
        assert_eq!((req.cwd, req.user), (None, None));
    }

    #[test]
    fn bad_users_and_env_entries_are_refused_with_the_form_expected() {
        for bad in [
            "",
            "1000",
            "a:b",
            "1000:",
            ":1",
            "-1:0",
            "1:2:3",
            "4294967296:0",
        ] {
            let e = parse_user(bad).unwrap_err();
            assert!(e.contains("UID:GID"), "{bad}: {e}");
        }
        assert_eq!(
            parse_user("4294967295:7").unwrap(),
            ExecUser {
                uid: u32::MAX,
                gid: 7
            }
        );
        for bad in ["", "=x", "NOEQUALS", "A\0=b"] {
            assert!(parse_env(bad).unwrap_err().contains("KEY=VALUE"), "{bad}");
        }
    }
}
