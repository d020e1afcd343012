//! Fork and export of a session against the tools an operator would use on
//! the same tree, in the same run: `turnstile_broker::tree::copy` (what
//! `ForkSession` runs) against `cp -a --reflink=auto`, and
//! `turnstile_broker::archive::export` (what `ExportSession` streams)
//! against `tar --sparse -c`. Reported: time (p50 of the runs) and bytes
//! written (allocated bytes of the copy, size of the archive), with ratios.
//! Goal: ≤ 1.2× the baseline on both.
//!
//! The session: 1 GiB of real data (one ~1014 MiB file and one 10 MiB file
//! with 100 hard links), and four 7 GiB sparse files (28 GiB of holes).
//! The page cache is warm for both sides alike (the tree is read once
//! before the runs).
//!
//! Reproduce: `cargo bench -p turnstile-benches --bench session_copy`.
//! The smoke run (`cargo test --benches`) uses 32 MiB of data and one run.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Instant;
use turnstile_benches::report;
use turnstile_broker::{archive, tree};

fn fill(path: &Path, bytes: u64, seed: u64) {
    let mut f = std::fs::File::create(path).expect("create");
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            // xorshift: data no filesystem can compress away or treat as holes.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).expect("write");
        left -= n as u64;
    }
    f.sync_all().expect("sync");
}

fn build(root: &Path, data_mib: u64) {
    let home = root.join("home");
    let work = root.join("work");
    std::fs::create_dir_all(&home).expect("mkdir");
    std::fs::create_dir_all(&work).expect("mkdir");
    fill(&work.join("data"), (data_mib - 10) << 20, 7);
    fill(&home.join("linked"), 10 << 20, 11);
    for i in 0..100 {
        std::fs::hard_link(home.join("linked"), home.join(format!("link{i}"))).expect("link");
    }
    for i in 0..4 {
        let f = std::fs::File::create(work.join(format!("sparse{i}"))).expect("create");
        f.set_len(7 << 30).expect("len");
        std::os::unix::fs::FileExt::write_at(&f, b"middle", 3 << 30).expect("write");
    }
    std::fs::write(root.join("meta.json"), b"{}").expect("meta");
}

/// Writes back every dirty page, so a measurement never pays for the
/// previous one's writes.
fn settle() {
    rustix::fs::sync();
}

fn allocated(p: &Path) -> u64 {
    tree::usage(tree::open_dir_path(p).expect("open"))
        .expect("usage")
        .bytes
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn line(what: &str, ours: u64, theirs: u64, base: &str) {
    println!(
        "REPORT {what} bytes written: {:.1} MiB | {base}: {:.1} MiB | ratio {:.2}x",
        ours as f64 / (1 << 20) as f64,
        theirs as f64 / (1 << 20) as f64,
        ours as f64 / (theirs as f64).max(1.0)
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (data_mib, runs) = if bench { (1024, 6) } else { (32, 2) };
    // On the filesystem of the state dir (not a tmpfs /tmp): the target dir.
    let base = turnstile_benches::workspace().join("target/bench-session-copy");
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("mkdir");
    let dir = tempfile::tempdir_in(&base).expect("tempdir");
    let src = dir.path().join("src");
    build(&src, data_mib);
    // Warm the page cache for both sides alike.
    run(Command::new("tar")
        .args(["--sparse", "-cf", "/dev/null", "-C"])
        .arg(&src)
        .arg("."));
    let src_fd = tree::open_dir_path(&src).expect("open");

    let (mut fork_t, mut cp_t, mut exp_t, mut tar_t) = (vec![], vec![], vec![], vec![]);
    let (mut fork_b, mut cp_b, mut exp_b, mut tar_b) = (0, 0, 0, 0);
    for i in 0..runs {
        // Each side starts from the same state (no dirty pages of the
        // other's writes), and the order alternates between runs.
        let fork = |t: &mut Vec<_>, b: &mut u64| {
            let ours = dir.path().join(format!("fork{i}"));
            std::fs::create_dir(&ours).expect("mkdir");
            settle();
            let start = Instant::now();
            tree::copy(
                &src_fd,
                &tree::open_dir_path(&ours).expect("open"),
                &["home", "work"],
            )
            .expect("copy");
            t.push(start.elapsed());
            *b = allocated(&ours);
            std::fs::remove_dir_all(&ours).expect("rm");
        };
        let cp = |t: &mut Vec<_>, b: &mut u64| {
            let theirs = dir.path().join(format!("cp{i}"));
            settle();
            let start = Instant::now();
            run(Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&src)
                .arg(&theirs));
            t.push(start.elapsed());
            *b = allocated(&theirs.join("home")) + allocated(&theirs.join("work"));
            std::fs::remove_dir_all(&theirs).expect("rm");
        };
        let export = |t: &mut Vec<_>, b: &mut u64| {
            let out = dir.path().join(format!("export{i}.tar"));
            settle();
            let start = Instant::now();
            let f = std::fs::File::create(&out).expect("create");
            let mut w = std::io::BufWriter::with_capacity(64 * 1024, f);
            archive::export(&src_fd, &mut w).expect("export");
            w.into_inner().expect("flush").sync_all().expect("sync");
            t.push(start.elapsed());
            *b = std::fs::metadata(&out).expect("meta").len();
            std::fs::remove_file(&out).expect("rm");
        };
        let tar = |t: &mut Vec<_>, b: &mut u64| {
            let out = dir.path().join(format!("tar{i}.tar"));
            settle();
            let start = Instant::now();
            run(Command::new("tar")
                .args(["--sparse", "-cf"])
                .arg(&out)
                .arg("-C")
                .arg(&src)
                .args(["home", "work", "meta.json"]));
            std::fs::File::open(&out)
                .expect("open")
                .sync_all()
                .expect("sync");
            t.push(start.elapsed());
            *b = std::fs::metadata(&out).expect("meta").len();
            std::fs::remove_file(&out).expect("rm");
        };
        if i % 2 == 0 {
            fork(&mut fork_t, &mut fork_b);
            cp(&mut cp_t, &mut cp_b);
            export(&mut exp_t, &mut exp_b);
            tar(&mut tar_t, &mut tar_b);
        } else {
            cp(&mut cp_t, &mut cp_b);
            fork(&mut fork_t, &mut fork_b);
            tar(&mut tar_t, &mut tar_b);
            export(&mut exp_t, &mut exp_b);
        }
    }
    report(
        "fork (tree::copy)",
        &fork_t,
        Some(("cp -a --reflink=auto", &cp_t)),
    );
    line("fork", fork_b, cp_b, "cp -a --reflink=auto");
    report(
        "export (archive::export)",
        &exp_t,
        Some(("tar --sparse -c", &tar_t)),
    );
    line("export", exp_b, tar_b, "tar --sparse -c");
    drop(dir);
    let _ = std::fs::remove_dir_all(&base);
}
