//! Agent profiles: what an agent's CLI needs to reach its model through the
//! LLM relay and to run offline in a jail. A profile names the variables
//! set to the bridge URL (with a path suffix: Codex wants `/v1`), the
//! variables set to a placeholder credential (a CLI that refuses to start
//! without a key then starts; the forwarder replaces whatever the agent
//! sends), extra environment (turning off the CLI's non-essential
//! traffic), config files the broker writes into the session home before
//! every turn (never holding a secret), read-only bundle mounts, and how
//! the upstream takes the credential (told to the executor in `Started`).
//!
//! Built in: `claude-code` and `codex`; the config file's `[profiles.NAME]`
//! tables add profiles, or change a built-in one field by field (a field
//! left out keeps the built-in value). Without a profile a turn gets the
//! Anthropic pair ([`AgentProfile::default_pair`]).
//!
//! The files are written by descriptor below the session home, which the
//! agent controls: each directory is entered with `O_NOFOLLOW`, a missing
//! one is made (owned by the agent), and the file is written to a fresh
//! name and renamed over the old one, so a link the agent left in the way
//! is replaced, never followed.

use crate::tree;
use crate::validate;
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;

/// The value of the placeholder credential variables: not a secret.
pub const PLACEHOLDER: &str = "turnstile-relay";
/// Most config files a profile may have.
pub const MAX_FILES: usize = 16;
/// Largest config file a profile may have.
pub const MAX_FILE_BYTES: usize = 64 << 10;
/// What a file's content may name: replaced when it is written.
const TEMPLATE_BASE_URL: &str = "{{base_url}}";
const TEMPLATE_PLACEHOLDER: &str = "{{placeholder}}";

/// How the upstream takes the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CredentialHeader {
    /// `x-api-key: KEY` (Anthropic).
    #[serde(rename = "x-api-key")]
    XApiKey,
    /// `authorization: Bearer KEY` (OpenAI and most others).
    #[serde(rename = "authorization")]
    AuthorizationBearer,
}

/// A config file the broker writes into the session home before a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileFile {
    /// Relative to the home: plain names joined by `/`.
    pub path: String,
    /// May name `{{base_url}}` (the bridge URL with the profile's suffix)
    /// and `{{placeholder}}`.
    pub content: String,
    pub mode: u32,
}

/// One agent profile, complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentProfile {
    /// "" for the default pair.
    pub name: String,
    /// Variables set to the bridge URL (plus `base_url_path`).
    pub base_url_env: Vec<String>,
    /// Variables set to [`AgentProfile::placeholder`].
    pub credential_env: Vec<String>,
    pub placeholder: String,
    pub credential_header: CredentialHeader,
    /// Appended to the bridge URL: `""` or `/v1`-like.
    pub base_url_path: String,
    /// Extra environment of the agent (`Start.env` wins over it).
    pub env: BTreeMap<String, String>,
    pub files: Vec<ProfileFile>,
    /// Read-only mounts, `SRC` or `SRC:DST`, beside the broker's own.
    pub bundle_mounts: Vec<String>,
}

const CODEX_CONFIG: &str = r#"# Written by turnstile before every turn (profile "codex"): the model
# provider is the turn's LLM relay. Changes here are overwritten.
model_provider = "turnstile"
check_for_update_on_startup = false

[model_providers.turnstile]
name = "turnstile relay"
base_url = "{{base_url}}"
env_key = "OPENAI_API_KEY"
wire_api = "responses"

[analytics]
enabled = false
"#;

impl Default for AgentProfile {
    fn default() -> Self {
        AgentProfile::default_pair()
    }
}

impl AgentProfile {
    /// Without a profile: `ANTHROPIC_BASE_URL` and a placeholder
    /// `ANTHROPIC_API_KEY`, nothing else.
    pub fn default_pair() -> AgentProfile {
        AgentProfile {
            name: String::new(),
            base_url_env: vec!["ANTHROPIC_BASE_URL".into()],
            credential_env: vec!["ANTHROPIC_API_KEY".into()],
            placeholder: PLACEHOLDER.into(),
            credential_header: CredentialHeader::XApiKey,
            base_url_path: String::new(),
            env: BTreeMap::new(),
            files: Vec::new(),
            bundle_mounts: Vec::new(),
        }
    }

    /// A user profile's starting point: nothing set, x-api-key.
    fn empty(name: &str) -> AgentProfile {
        AgentProfile {
            name: name.into(),
            base_url_env: Vec::new(),
            credential_env: Vec::new(),
            ..AgentProfile::default_pair()
        }
    }

    /// Claude Code: the Anthropic pair, and its non-essential traffic
    /// (auto-updater, telemetry, error reports) off.
    pub fn claude_code() -> AgentProfile {
        let env = [
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
            ("DISABLE_AUTOUPDATER", "1"),
            ("DISABLE_TELEMETRY", "1"),
            ("DISABLE_ERROR_REPORTING", "1"),
        ];
        AgentProfile {
            name: "claude-code".into(),
            env: env
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..AgentProfile::default_pair()
        }
    }

    /// Codex CLI: it ignores `OPENAI_BASE_URL` for its built-in provider, so
    /// a provider of its own in `~/.codex/config.toml` points at the relay
    /// (with `/v1`), its key read from the placeholder `OPENAI_API_KEY`.
    pub fn codex() -> AgentProfile {
        AgentProfile {
            name: "codex".into(),
            base_url_env: vec!["OPENAI_BASE_URL".into()],
            credential_env: vec!["OPENAI_API_KEY".into()],
            credential_header: CredentialHeader::AuthorizationBearer,
            base_url_path: "/v1".into(),
            files: vec![ProfileFile {
                path: ".codex/config.toml".into(),
                content: CODEX_CONFIG.into(),
                mode: 0o600,
            }],
            ..AgentProfile::default_pair()
        }
    }

    /// What `Started` tells the executor's forwarder.
    pub fn started_info(&self) -> turnstile_proto::v1::LlmProfile {
        use turnstile_proto::v1::CredentialHeader as Pb;
        turnstile_proto::v1::LlmProfile {
            name: self.name.clone(),
            credential_header: match self.credential_header {
                CredentialHeader::XApiKey => Pb::XApiKey,
                CredentialHeader::AuthorizationBearer => Pb::AuthorizationBearer,
            } as i32,
            base_path: self.base_url_path.clone(),
        }
    }

    /// Whether a file names the bridge URL (its port must be known before
    /// the agent starts).
    pub fn files_need_url(&self) -> bool {
        self.files
            .iter()
            .any(|f| f.content.contains(TEMPLATE_BASE_URL))
    }

    /// The files with their templates filled in.
    pub fn render_files(&self, base_url: &str) -> Vec<(String, Vec<u8>, u32)> {
        self.files
            .iter()
            .map(|f| {
                let text = f
                    .content
                    .replace(TEMPLATE_BASE_URL, base_url)
                    .replace(TEMPLATE_PLACEHOLDER, &self.placeholder);
                (f.path.clone(), text.into_bytes(), f.mode)
            })
            .collect()
    }

    /// Every rule a profile must keep; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.name.is_empty() && validate::session_id(&self.name).is_err() {
            return Err("the name must be [A-Za-z0-9][A-Za-z0-9._-]{0,127}".into());
        }
        let var = |field: &str, k: &str| -> Result<(), String> {
            if !validate::is_env_key(k) {
                return Err(format!("{field}: {k:?} is not a variable name"));
            }
            if validate::is_protected_env(k) {
                return Err(format!("{field}: {k} is set by the broker"));
            }
            Ok(())
        };
        for k in &self.base_url_env {
            var("base_url_env", k)?;
        }
        for k in &self.credential_env {
            var("credential_env", k)?;
            if self.base_url_env.contains(k) {
                return Err(format!(
                    "credential_env: {k} is also in base_url_env (a variable holds one of them)"
                ));
            }
        }
        if self.placeholder.is_empty() || has_control(&self.placeholder) {
            return Err("placeholder: empty or holds a control character".into());
        }
        let path = &self.base_url_path;
        let path_ok = path.is_empty()
            || (path.starts_with('/')
                && path.len() <= 256
                && !path.ends_with('/')
                && !path.split('/').any(|c| c == "." || c == "..")
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b)));
        if !path_ok {
            return Err(format!(
                "base_url_path {path:?}: want \"\" or an absolute path like \"/v1\" (letters, digits, -._~), without a trailing /"
            ));
        }
        for (k, v) in &self.env {
            var("env", k)?;
            if self.base_url_env.contains(k) || self.credential_env.contains(k) {
                return Err(format!(
                    "env: {k} is in base_url_env or credential_env, which set it"
                ));
            }
            if has_control(v) {
                return Err(format!("env: the value of {k} holds a control character"));
            }
        }
        if self.files.len() > MAX_FILES {
            return Err(format!("files: at most {MAX_FILES}"));
        }
        let mut seen = Vec::new();
        for f in &self.files {
            let rel = validate::cwd(&f.path).ok().filter(|p| !p.is_empty());
            let Some(rel) = rel.filter(|r| *r == f.path) else {
                return Err(format!(
                    "files: path {:?}: want a relative path below the home, plain names joined by /",
                    f.path
                ));
            };
            if seen.contains(&rel) {
                return Err(format!("files: {rel} is named twice"));
            }
            seen.push(rel);
            if f.content.len() > MAX_FILE_BYTES {
                return Err(format!("files: {} is over {MAX_FILE_BYTES} bytes", f.path));
            }
            if f.mode & !0o777 != 0 || f.mode & 0o400 == 0 {
                return Err(format!(
                    "files: {} mode {:o}: want permission bits only, readable by the owner",
                    f.path, f.mode
                ));
            }
            let mut rest = f.content.as_str();
            while let Some(i) = rest.find("{{") {
                let tail = &rest[i..];
                if !tail.starts_with(TEMPLATE_BASE_URL) && !tail.starts_with(TEMPLATE_PLACEHOLDER) {
                    let shown: String = tail.chars().take(24).collect();
                    return Err(format!(
                        "files: {} names {shown:?}: a file may name only {TEMPLATE_BASE_URL} and {TEMPLATE_PLACEHOLDER}",
                        f.path
                    ));
                }
                rest = &tail[2..];
            }
        }
        for m in &self.bundle_mounts {
            crate::config::parse_bundle_mount(m).map_err(|e| format!("bundle_mounts: {e}"))?;
        }
        Ok(())
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(|c| c.is_control() && c != '\t')
}

/// The profiles a broker knows, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profiles(BTreeMap<String, AgentProfile>);

impl Default for Profiles {
    /// The built-in ones.
    fn default() -> Self {
        Profiles(
            [AgentProfile::claude_code(), AgentProfile::codex()]
                .into_iter()
                .map(|p| (p.name.clone(), p))
                .collect(),
        )
    }
}

impl Profiles {
    pub fn get(&self, name: &str) -> Option<&AgentProfile> {
        self.0.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    pub fn validate(&self) -> Result<(), (String, String)> {
        for (name, p) in &self.0 {
            p.validate().map_err(|why| (name.clone(), why))?;
        }
        Ok(())
    }
}

/// A `[profiles.NAME]` table: only what it names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileTable {
    base_url_env: Option<Vec<String>>,
    credential_env: Option<Vec<String>>,
    placeholder: Option<String>,
    credential_header: Option<CredentialHeader>,
    base_url_path: Option<String>,
    env: Option<BTreeMap<String, String>>,
    files: Option<Vec<FileTable>>,
    bundle_mounts: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTable {
    path: String,
    content: String,
    /// Default 0600.
    mode: Option<u32>,
}

impl ProfileTable {
    fn over(self, base: AgentProfile) -> AgentProfile {
        AgentProfile {
            name: base.name,
            base_url_env: self.base_url_env.unwrap_or(base.base_url_env),
            credential_env: self.credential_env.unwrap_or(base.credential_env),
            placeholder: self.placeholder.unwrap_or(base.placeholder),
            credential_header: self.credential_header.unwrap_or(base.credential_header),
            base_url_path: self.base_url_path.unwrap_or(base.base_url_path),
            env: self.env.unwrap_or(base.env),
            files: match self.files {
                Some(files) => files
                    .into_iter()
                    .map(|f| ProfileFile {
                        path: f.path,
                        content: f.content,
                        mode: f.mode.unwrap_or(0o600),
                    })
                    .collect(),
                None => base.files,
            },
            bundle_mounts: self.bundle_mounts.unwrap_or(base.bundle_mounts),
        }
    }
}

impl<'de> Deserialize<'de> for Profiles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let tables = BTreeMap::<String, ProfileTable>::deserialize(d)?;
        let mut profiles = Profiles::default();
        for (name, table) in tables {
            let base = profiles
                .0
                .remove(&name)
                .unwrap_or_else(|| AgentProfile::empty(&name));
            profiles.0.insert(name, table.over(base));
        }
        Ok(profiles)
    }
}

/// Why a profile's file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path} in the session home: {source}")]
pub struct FileError {
    pub path: String,
    #[source]
    pub source: io::Error,
}

/// Writes `files` (from [`AgentProfile::render_files`]) below `home`,
/// owned by `owner` when given (the jail's uid and gid).
pub fn write_files(
    home: &OwnedFd,
    files: &[(String, Vec<u8>, u32)],
    owner: Option<(u32, u32)>,
) -> Result<(), FileError> {
    for (path, bytes, mode) in files {
        write_file(home, path, bytes, *mode, owner).map_err(|source| FileError {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}

fn write_file(
    home: &OwnedFd,
    path: &str,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let (dirs, leaf) = match path.rsplit_once('/') {
        Some((d, l)) => (Some(d), l),
        None => (None, path),
    };
    let mut dir = rfs::openat(home, ".", OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    for name in dirs.into_iter().flat_map(|d| d.split('/')) {
        dir = enter(&dir, name, owner)?;
    }
    let tmp = format!(".{leaf}.turnstile-{:08x}", rand::random::<u32>());
    let fd = rfs::openat(
        &dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let result = (|| {
        own(&fd, owner)?;
        // After the chown, which clears nothing we set, and regardless of
        // the umask the file was created under.
        rfs::fchmod(&fd, Mode::from_raw_mode(mode))?;
        let mut f = std::fs::File::from(fd);
        io::Write::write_all(&mut f, bytes)?;
        f.sync_all()?;
        // A link or a file in the way is replaced; a directory is not
        // (EISDIR), and the turn is refused naming it.
        rfs::renameat(&dir, tmp.as_str(), &dir, leaf)?;
        Ok::<_, io::Error>(())
    })();
    if result.is_err() {
        let _ = rfs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
    }
    result
}

/// Enters directory `name` of `dir` without following a link, making it
/// (0700, owned by `owner`) when missing.
fn enter(dir: &OwnedFd, name: &str, owner: Option<(u32, u32)>) -> io::Result<OwnedFd> {
    match tree::open_dir(dir, OsStr::new(name)) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
            match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            let fd = tree::open_dir(dir, OsStr::new(name))?;
            own(&fd, owner)?;
            Ok(fd)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name} is not a directory (a link or a file is in the way)"),
            ))
        }
        other => other,
    }
}

use crate::tree::chown_to as own;

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn built_in_profiles_are_valid() {
        let all = Profiles::default();
        assert_eq!(all.names(), ["claude-code", "codex"]);
        all.validate().expect("valid");
        AgentProfile::default_pair().validate().expect("valid");
        let codex = all.get("codex").expect("codex");
        assert!(codex.files_need_url());
        let files = codex.render_files("http://127.0.0.1:8787/v1");
        let text = String::from_utf8(files[0].1.clone()).expect("utf-8");
        assert!(
            text.contains("base_url = \"http://127.0.0.1:8787/v1\""),
            "{text}"
        );
        assert!(text.contains("env_key = \"OPENAI_API_KEY\""), "{text}");
        let parsed: toml::Table = toml::from_str(&text).expect("codex config is TOML");
        assert_eq!(parsed["model_provider"].as_str(), Some("turnstile"));
    }

    #[test]
    fn tables_change_built_ins_field_by_field_and_add_profiles() {
        #[derive(Deserialize)]
        struct T {
            profiles: Profiles,
        }
        let t: T = toml::from_str(
            r#"
            [profiles.claude-code]
            bundle_mounts = ["/opt/claude"]
            [profiles.mine]
            base_url_env = ["MY_URL"]
            credential_env = ["MY_KEY"]
            credential_header = "authorization"
            base_url_path = "/api/v2"
            env = { MY_OFFLINE = "1" }
            files = [{ path = ".mine/conf", content = "url={{base_url}} key={{placeholder}}", mode = 0o644 }]
            "#,
        )
        .expect("parses");
        t.profiles.validate().expect("valid");
        let claude = t.profiles.get("claude-code").expect("kept");
        assert_eq!(claude.bundle_mounts, ["/opt/claude"]);
        assert_eq!(claude.env, AgentProfile::claude_code().env);
        assert!(t.profiles.get("codex").is_some());
        let mine = t.profiles.get("mine").expect("added");
        assert_eq!(
            mine.credential_header,
            CredentialHeader::AuthorizationBearer
        );
        let files = mine.render_files("http://h/api/v2");
        assert_eq!(files[0].1, b"url=http://h/api/v2 key=turnstile-relay");
        assert_eq!(files[0].2, 0o644);
    }

    #[test]
    fn bad_profiles_are_refused_naming_the_field() {
        let base = AgentProfile::empty("p");
        let cases: Vec<(AgentProfile, &str)> = vec![
            (
                AgentProfile {
                    base_url_env: vec!["HOME".into()],
                    ..base.clone()
                },
                "base_url_env",
            ),
            (
                AgentProfile {
                    credential_env: vec!["1X".into()],
                    ..base.clone()
                },
                "credential_env",
            ),
            (
                AgentProfile {
                    base_url_env: vec!["K".into()],
                    credential_env: vec!["K".into()],
                    ..base.clone()
                },
                "credential_env",
            ),
            (
                AgentProfile {
                    placeholder: "a\nb".into(),
                    ..base.clone()
                },
                "placeholder",
            ),
            (
                AgentProfile {
                    base_url_path: "v1".into(),
                    ..base.clone()
                },
                "base_url_path",
            ),
            (
                AgentProfile {
                    base_url_path: "/v1?x=1".into(),
                    ..base.clone()
                },
                "base_url_path",
            ),
            (
                AgentProfile {
                    base_url_path: "/../x".into(),
                    ..base.clone()
                },
                "base_url_path",
            ),
            (
                AgentProfile {
                    env: [("TURNSTILE_X".to_string(), "1".to_string())].into(),
                    ..base.clone()
                },
                "env",
            ),
            (
                AgentProfile {
                    bundle_mounts: vec!["rel".into()],
                    ..base.clone()
                },
                "bundle_mounts",
            ),
        ];
        for (p, field) in cases {
            let err = p.validate().expect_err("refused");
            assert!(err.starts_with(field), "{field}: {err}");
        }
        for (path, content, mode) in [
            ("/etc/passwd", "", 0o600),
            ("../x", "", 0o600),
            ("a/../b", "", 0o600),
            ("a//b", "", 0o600),
            ("", "", 0o600),
            ("a", "{{key}}", 0o600),
            ("a", "", 0o4755),
            ("a", "", 0o200),
        ] {
            let p = AgentProfile {
                files: vec![ProfileFile {
                    path: path.into(),
                    content: content.into(),
                    mode,
                }],
                ..base.clone()
            };
            let err = p.validate().expect_err(path);
            assert!(err.starts_with("files"), "{path}: {err}");
        }
    }

    #[test]
    fn files_are_written_beneath_the_home_without_following_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        let home = dir.path().join("home");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&home).expect("home");
        std::fs::create_dir_all(&outside).expect("outside");
        let fd = tree::open_dir_path(&home).expect("open");
        let files = vec![(".codex/config.toml".to_string(), b"a".to_vec(), 0o640)];
        write_files(&fd, &files, None).expect("written");
        let got = home.join(".codex/config.toml");
        assert_eq!(std::fs::read(&got).expect("read"), b"a");
        let mode = std::fs::metadata(&got).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        // Rewritten on the next turn.
        let files2 = vec![(".codex/config.toml".to_string(), b"b".to_vec(), 0o600)];
        write_files(&fd, &files2, None).expect("rewritten");
        assert_eq!(std::fs::read(&got).expect("read"), b"b");

        // A link as the file is replaced, its target untouched.
        std::fs::write(outside.join("victim"), "keep").expect("victim");
        std::fs::remove_file(&got).expect("rm");
        std::os::unix::fs::symlink(outside.join("victim"), &got).expect("link");
        write_files(&fd, &files, None).expect("written over the link");
        assert_eq!(std::fs::read(&got).expect("read"), b"a");
        assert!(!std::fs::symlink_metadata(&got).expect("meta").is_symlink());
        assert_eq!(
            std::fs::read(outside.join("victim")).expect("victim"),
            b"keep"
        );

        // A link as a directory is refused, nothing is written through it.
        std::fs::remove_dir_all(home.join(".codex")).expect("rm");
        std::os::unix::fs::symlink(&outside, home.join(".codex")).expect("link");
        let err = write_files(&fd, &files, None).expect_err("refused");
        assert!(
            err.to_string().contains(".codex is not a directory"),
            "{err}"
        );
        assert!(!outside.join("config.toml").exists());

        // A directory where the file goes is refused too.
        std::fs::remove_file(home.join(".codex")).expect("rm");
        std::fs::create_dir_all(home.join(".codex/config.toml")).expect("dir");
        write_files(&fd, &files, None).expect_err("a directory in the way");
        let left: Vec<_> = std::fs::read_dir(home.join(".codex"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, ["config.toml"], "no temp file left behind");
    }
}
