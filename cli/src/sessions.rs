//! `turnstile sessions ...`: list, show, remove, fork, export, import,
//! garbage-collect sessions, and cancel or interrupt their turns, over the
//! broker's socket.

use crate::args::{SessionsArgs, SessionsCommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use turnstile_client::connect_unix;
use turnstile_proto::v1 as pb;

/// A field as the terminal may show it: control characters (which could
/// come from an imported session's metadata) escaped, never sent raw.
fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect()
}

/// Writes to stdout; a reader that went away (`| head`) ends the output
/// quietly, as it does for any Unix tool.
fn write_stdout(text: &str) -> Result<(), String> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("cannot write to stdout: {e}")),
    }
}

fn info_json(i: &pb::SessionInfo) -> serde_json::Value {
    serde_json::json!({
        "session_id": i.session_id,
        "created_unix_ms": i.created_unix_ms,
        "turn_count": i.turn_count,
        "last_turn_id": i.last_turn_id,
        "last_turn_start_unix_ms": i.last_turn_start_unix_ms,
        "last_turn_end_unix_ms": i.last_turn_end_unix_ms,
        "last_exit_reason": i.last_exit_reason,
        "disk_usage_bytes": i.disk_usage_bytes,
        "running_turn_id": i.running_turn_id,
        "holder_worker": i.holder_worker,
        "generation": i.generation,
        "archive_bytes": i.archive_bytes,
        "last_worker": i.last_worker,
        "local_copy": i.local_copy,
    })
}

/// `turnstile sessions ...`: returns the process exit code.
pub async fn sessions(args: SessionsArgs) -> i32 {
    match sessions_inner(args).await {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("turnstile: {msg}");
            1
        }
    }
}

async fn sessions_inner(args: SessionsArgs) -> Result<(), String> {
    let channel = connect_unix(args.socket.clone()).await.map_err(|e| {
        format!(
            "cannot reach the broker at {}: {e}; is `turnstile serve` running?",
            args.socket.display()
        )
    })?;
    let mut c = pb::broker_client::BrokerClient::new(channel);
    let r = |id: String| pb::SessionRef { session_id: id };
    let status = |s: tonic::Status| s.message().to_string();
    match args.command {
        SessionsCommand::Ls => {
            let list = c
                .list_sessions(pb::ListSessionsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            // In fleet mode (some session has a generation or a worker in
            // the catalog): the generation, its archive's size, and the
            // worker that holds it (or ran it last).
            let fleet = list
                .sessions
                .iter()
                .any(|s| s.generation != 0 || !s.last_worker.is_empty());
            let mut out = format!(
                "{:<32} {:>6} {:<16} {:>12} ",
                "SESSION", "TURNS", "LAST EXIT", "DISK"
            );
            if fleet {
                out.push_str(&format!("{:>5} {:>12} {:<16} ", "GEN", "ARCHIVE", "WORKER"));
            }
            out.push_str("RUNNING\n");
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_string()
                } else {
                    printable(s)
                }
            };
            for s in list.sessions {
                out.push_str(&format!(
                    "{:<32} {:>6} {:<16} {:>12} ",
                    printable(&s.session_id),
                    s.turn_count,
                    dash(&s.last_exit_reason),
                    s.disk_usage_bytes,
                ));
                if fleet {
                    let worker = if s.holder_worker.is_empty() {
                        dash(&s.last_worker)
                    } else {
                        format!("{} (holds)", printable(&s.holder_worker))
                    };
                    out.push_str(&format!(
                        "{:>5} {:>12} {:<16} ",
                        s.generation, s.archive_bytes, worker
                    ));
                }
                out.push_str(&format!("{}\n", dash(&s.running_turn_id)));
            }
            write_stdout(&out)?;
        }
        SessionsCommand::Show { id } => {
            let i = c.get_session(r(id)).await.map_err(status)?.into_inner();
            write_stdout(&format!("{}\n", info_json(&i)))?;
        }
        SessionsCommand::Rm { id } => {
            c.delete_session(r(id.clone())).await.map_err(status)?;
            eprintln!("deleted {id}");
        }
        SessionsCommand::Fork { source, new_id } => {
            let i = c
                .fork_session(pb::ForkSessionRequest {
                    source_session_id: source,
                    new_session_id: new_id,
                })
                .await
                .map_err(status)?
                .into_inner();
            write_stdout(&format!("{}\n", info_json(&i)))?;
        }
        SessionsCommand::Export { id, output } => {
            let mut stream = c.export_session(r(id)).await.map_err(status)?.into_inner();
            if output.as_os_str() == "-" {
                let mut out = tokio::io::stdout();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(status)?;
                    out.write_all(&chunk.data)
                        .await
                        .map_err(|e| format!("cannot write the archive: {e}"))?;
                }
                out.flush()
                    .await
                    .map_err(|e| format!("cannot write the archive: {e}"))?;
                return Ok(());
            }
            // A temp file beside the output, renamed over it only when the
            // whole archive is in: a failed export leaves no file behind.
            let dir = match output.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => std::path::PathBuf::from("."),
            };
            let tmp = tempfile::Builder::new()
                .prefix(".turnstile-export-")
                .tempfile_in(&dir)
                .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
            let mut out = tokio::fs::File::from_std(
                tmp.reopen()
                    .map_err(|e| format!("cannot open {}: {e}", tmp.path().display()))?,
            );
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(status)?;
                out.write_all(&chunk.data)
                    .await
                    .map_err(|e| format!("cannot write the archive: {e}"))?;
            }
            out.sync_all()
                .await
                .map_err(|e| format!("cannot write the archive: {e}"))?;
            drop(out);
            tmp.persist(&output)
                .map_err(|e| format!("cannot create {}: {e}", output.display()))?;
        }
        SessionsCommand::Import { id, input } => {
            let mut src: Box<dyn tokio::io::AsyncRead + Unpin + Send> = if input.as_os_str() == "-"
            {
                Box::new(tokio::io::stdin())
            } else {
                Box::new(
                    tokio::fs::File::open(&input)
                        .await
                        .map_err(|e| format!("cannot open {}: {e}", input.display()))?,
                )
            };
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            let reader = tokio::spawn(async move {
                let _ = tx
                    .send(pb::ImportSessionRequest {
                        session_id: id,
                        data: bytes::Bytes::new(),
                    })
                    .await;
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match src.read(&mut buf).await {
                        Ok(0) => return Ok(()),
                        Ok(n) => {
                            let msg = pb::ImportSessionRequest {
                                session_id: String::new(),
                                data: bytes::Bytes::copy_from_slice(&buf[..n]),
                            };
                            if tx.send(msg).await.is_err() {
                                return Ok(());
                            }
                        }
                        Err(e) => return Err(format!("cannot read the archive: {e}")),
                    }
                }
            });
            let i = c
                .import_session(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(status)?
                .into_inner();
            reader.await.map_err(|e| e.to_string())??;
            write_stdout(&format!("{}\n", info_json(&i)))?;
        }
        SessionsCommand::Gc { dry_run } => {
            let g = c
                .gc_sessions(pb::GcRequest { dry_run })
                .await
                .map_err(status)?
                .into_inner();
            for s in g.sessions {
                let done = if dry_run { "would delete " } else { "deleted " };
                write_stdout(&format!("{done}{s}\n"))?;
            }
        }
        SessionsCommand::Cancel { id } => {
            let t = c.cancel_turn(r(id)).await.map_err(status)?.into_inner();
            eprintln!("cancelling turn {}", t.turn_id);
        }
        SessionsCommand::Interrupt { id } => {
            let t = c.interrupt_turn(r(id)).await.map_err(status)?.into_inner();
            eprintln!("interrupted turn {}", t.turn_id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(printable("exited"), "exited");
        assert_eq!(printable("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\n");
    }
}
