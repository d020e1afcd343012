//! Validation of everything an executor names: ids, environment, cwd.
//! Pure functions; nothing here touches disk.

use crate::error::InputError;

/// Longest session or turn id.
pub const MAX_ID_LEN: usize = 128;
/// Longest env key.
pub const MAX_ENV_KEY_LEN: usize = 256;

/// Keys the broker sets itself; `Start.env` may not override them.
pub const PROTECTED_ENV: &[&str] = &["HOME", "USER", "LOGNAME", "PWD", "TMPDIR"];
/// Prefix reserved for the broker.
pub const PROTECTED_ENV_PREFIX: &str = "TURNSTILE_";

fn is_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_ID_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && !id.contains("..")
}

/// A session id is a single safe path component: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`
/// and never `..`.
pub fn session_id(id: &str) -> Result<(), InputError> {
    if is_id(id) {
        Ok(())
    } else {
        Err(InputError::SessionId(id.to_string()))
    }
}

pub fn turn_key(key: &str) -> Result<(), InputError> {
    if is_id(key) {
        Ok(())
    } else {
        Err(InputError::TurnKey(key.to_string()))
    }
}

pub fn turn_id(id: &str) -> Result<(), InputError> {
    if is_id(id) {
        Ok(())
    } else {
        Err(InputError::TurnId(id.to_string()))
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_ENV_KEY_LEN`] bytes.
pub fn is_env_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_ENV_KEY_LEN
        && (bytes[0].is_ascii_alphabetic() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

pub fn is_protected_env(key: &str) -> bool {
    PROTECTED_ENV.contains(&key) || key.starts_with(PROTECTED_ENV_PREFIX)
}

/// Checks one `Start.env` entry. `extra_protected` holds the keys the broker
/// sets for this turn beyond [`PROTECTED_ENV`] (e.g. the LLM bridge vars).
pub fn env_entry(key: &str, value: &str, extra_protected: &[String]) -> Result<(), InputError> {
    if !is_env_key(key) {
        return Err(InputError::EnvKey(key.to_string()));
    }
    if is_protected_env(key) || extra_protected.iter().any(|k| k == key) {
        return Err(InputError::ProtectedEnv(key.to_string()));
    }
    // Tab is the one control character with an honest use in a value.
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(InputError::EnvValue(key.to_string()));
    }
    Ok(())
}

pub fn argv(argv: &[String]) -> Result<(), InputError> {
    if argv.is_empty() || argv[0].is_empty() {
        return Err(InputError::EmptyArgv);
    }
    if let Some(i) = argv.iter().position(|a| a.contains('\0')) {
        return Err(InputError::ArgvNul(i));
    }
    Ok(())
}

/// A cwd relative to the work dir: no absolute path, no `..`, no empty or
/// `.` components besides the whole being empty. Returns the normalised form
/// ("" for the work dir itself).
pub fn cwd(cwd: &str) -> Result<String, InputError> {
    let bad = || InputError::Cwd(cwd.to_string());
    if cwd.starts_with('/') || cwd.len() > 4096 || cwd.chars().any(|c| c.is_control()) {
        return Err(bad());
    }
    let mut parts = Vec::new();
    for part in cwd.split('/') {
        match part {
            "" | "." => continue,
            ".." => return Err(bad()),
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids() {
        for good in ["a", "A9", "s-1.2_3", &"x".repeat(128), "a.b"] {
            assert!(session_id(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "..",
            ".hidden",
            "-a",
            "_a",
            "a/b",
            "a\\b",
            "a b",
            "a..b",
            "a\0b",
            "é",
            &"x".repeat(129),
        ] {
            assert_eq!(
                session_id(bad),
                Err(InputError::SessionId(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn env_keys_and_values() {
        assert!(env_entry("FOO_1", "bar\tbaz", &[]).is_ok());
        assert!(env_entry("_X", "", &[]).is_ok());
        assert_eq!(
            env_entry("1X", "v", &[]),
            Err(InputError::EnvKey("1X".into()))
        );
        assert_eq!(
            env_entry("A=B", "v", &[]),
            Err(InputError::EnvKey("A=B".into()))
        );
        assert_eq!(env_entry("", "v", &[]), Err(InputError::EnvKey("".into())));
        assert_eq!(
            env_entry("A\0", "v", &[]),
            Err(InputError::EnvKey("A\0".into()))
        );
        assert_eq!(
            env_entry("A", "x\0y", &[]),
            Err(InputError::EnvValue("A".into()))
        );
        assert_eq!(
            env_entry("A", "x\ny", &[]),
            Err(InputError::EnvValue("A".into()))
        );
        assert_eq!(
            env_entry("A", "x\u{1b}[31m", &[]),
            Err(InputError::EnvValue("A".into()))
        );
        for key in ["HOME", "USER", "TMPDIR", "TURNSTILE_X"] {
            assert_eq!(
                env_entry(key, "v", &[]),
                Err(InputError::ProtectedEnv(key.into()))
            );
        }
        assert_eq!(
            env_entry("ANTHROPIC_BASE_URL", "v", &["ANTHROPIC_BASE_URL".into()]),
            Err(InputError::ProtectedEnv("ANTHROPIC_BASE_URL".into()))
        );
        assert!(env_entry(&"K".repeat(256), "v", &[]).is_ok());
        assert!(env_entry(&"K".repeat(257), "v", &[]).is_err());
    }

    #[test]
    fn argvs() {
        assert!(argv(&["sh".into()]).is_ok());
        assert_eq!(argv(&[]), Err(InputError::EmptyArgv));
        assert_eq!(argv(&["".into()]), Err(InputError::EmptyArgv));
        assert_eq!(
            argv(&["sh".into(), "a\0".into()]),
            Err(InputError::ArgvNul(1))
        );
    }

    #[test]
    fn cwds() {
        assert_eq!(cwd(""), Ok(String::new()));
        assert_eq!(cwd("."), Ok(String::new()));
        assert_eq!(cwd("a/./b//c/"), Ok("a/b/c".into()));
        for bad in ["/etc", "..", "a/../b", "a/..", "a\nb"] {
            assert_eq!(cwd(bad), Err(InputError::Cwd(bad.into())), "{bad}");
        }
    }
}
