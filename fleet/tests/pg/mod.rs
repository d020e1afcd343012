//! A throwaway PostgreSQL server per test: `initdb` on a temp data dir and
//! `pg_ctl` on a free loopback port (as the `postgres` user when the tests
//! run as root, since the server refuses to run as root), stopped and
//! removed when dropped. The binaries are found through `TURNSTILE_PG_BIN`,
//! else `/usr/lib/postgresql/<newest>/bin`, else `pg_config --bindir`.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TURNSTILE_PG_BIN") {
        return PathBuf::from(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    match Command::new("pg_config").arg("--bindir").output() {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        _ => panic!(
            "PostgreSQL server binaries not found (no /usr/lib/postgresql/*/bin/initdb, no pg_config): \
             install the postgresql package (scripts/test.sh does) or set TURNSTILE_PG_BIN"
        ),
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs a server binary, as `postgres` when we are root.
fn run(bin: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    cmd.args(args)
        .env("LC_ALL", "C")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()))
}

/// A data dir made by `initdb` once and copied for each server (initdb
/// takes seconds; a copy a fraction of that). Cached in cargo's temp dir
/// for integration tests, per server version.
fn template(bin: &Path) -> PathBuf {
    static TEMPLATE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            let version = bin
                .parent()
                .and_then(|p| p.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let cache =
                Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pg-template-{version}"));
            if cache.join("PG_VERSION").exists() {
                return cache;
            }
            let work = tempfile::Builder::new()
                .prefix("turnstile-pg-initdb-")
                .tempdir()
                .expect("tempdir");
            chown_to_postgres(work.path());
            let data = work.path().join("data");
            let out = run(
                &bin.join("initdb"),
                &[
                    "-D",
                    data.to_str().expect("utf-8 path"),
                    "-U",
                    "turnstile",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ],
            );
            assert!(
                out.status.success(),
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let staged = cache.with_extension(format!("tmp-{}", std::process::id()));
            let out = Command::new("cp")
                .arg("-a")
                .arg(&data)
                .arg(&staged)
                .output()
                .expect("cp");
            assert!(out.status.success(), "cannot cache the template");
            // Another test binary may have made it meanwhile: either is fine.
            if std::fs::rename(&staged, &cache).is_err() {
                let _ = std::fs::remove_dir_all(&staged);
            }
            cache
        })
        .clone()
}

fn chown_to_postgres(path: &Path) {
    if is_root() {
        let user = nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .expect("the postgres user (made by the postgresql package)");
        nix::unistd::chown(path, Some(user.uid), Some(user.gid)).expect("chown");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free loopback port")
}

impl Pg {
    pub fn start() -> Pg {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("turnstile-pg-")
            .tempdir()
            .expect("tempdir");
        chown_to_postgres(dir.path());
        let data = dir.path().join("data");
        let out = Command::new("cp")
            .arg("-a")
            .arg(template(&bin))
            .arg(&data)
            .output()
            .expect("cp");
        assert!(
            out.status.success(),
            "cannot copy the template data dir: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Pg { dir, bin, port: 0 };
        // The port is free when picked; another process may take it before
        // the server binds it: then pick again.
        for _ in 0..5 {
            pg.port = free_port();
            if pg.try_start() {
                return pg;
            }
        }
        panic!("cannot start PostgreSQL: see {}", pg.log().display());
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("log")
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn try_start(&self) -> bool {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.log().display().to_string();
        let out = run(
            &self.bin.join("pg_ctl"),
            &[
                "-D",
                &self.data(),
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        );
        out.status.success()
    }

    /// Starts the server again (after [`Pg::stop`]), on the same port.
    pub fn restart(&self) {
        assert!(
            self.try_start(),
            "cannot restart PostgreSQL: see {}",
            self.log().display()
        );
    }

    /// Stops the server at once (its connections are cut).
    pub fn stop(&self) {
        let out = run(
            &self.bin.join("pg_ctl"),
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self) -> String {
        format!("postgres://turnstile@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs one SQL statement on the server (test set-up and inspection).
    pub async fn sql(&self, sql: &str) -> Vec<tokio_postgres::Row> {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect");
        let task = tokio::spawn(conn);
        let rows = client.query(sql, &[]).await.expect(sql);
        drop(client);
        let _ = task.await;
        rows
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if self.dir.path().join("data/postmaster.pid").exists() {
            let _ = run(
                &self.bin.join("pg_ctl"),
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            );
        }
    }
}
