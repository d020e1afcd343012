//! The Rust client's side of the Python client benchmark
//! (clients/python/bench/bench.py): turns on a running broker, timed the way
//! the Python side times them, one sample per line on stdout.
//!
//! `client_peer SOCKET start N SESSION`: N turns of `/bin/true`; each line is
//! the microseconds from sending `Start` to receiving `Started`, then the
//! broker's own part of it (`Started.spawn_us`).
//! `client_peer SOCKET relay N SESSION BYTES`: N turns of `head -c BYTES
//! /dev/zero`; each line is the microseconds from `Started` to `Exited`, with
//! every stdout byte counted on the way.
//!
//! One warm-up turn runs first, unmeasured, on the same channel.

use std::process::ExitCode;
use std::time::{Duration, Instant};
use turnstile_client::{Turn, connect_unix, pb};

async fn turn(
    client: &mut pb::broker_client::BrokerClient<tonic::transport::Channel>,
    session: &str,
    argv: &[String],
) -> Result<(Duration, Duration, u64, u64), String> {
    let start = pb::Start {
        session_id: session.to_string(),
        argv: argv.to_vec(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut turn = Turn::start(client, start, None)
        .await
        .map_err(|s| format!("turn refused: {}", s.message()))?;
    turn.input()
        .close_stdin()
        .await
        .map_err(|e| e.to_string())?;
    let mut started = None;
    let mut spawn_us = 0;
    let mut bytes = 0u64;
    while let Some(event) = turn.next().await {
        match event
            .map_err(|s| format!("turn failed: {}", s.message()))?
            .kind
        {
            Some(pb::turn_event::Kind::Started(s)) => {
                started = Some(Instant::now());
                spawn_us = s.spawn_us;
            }
            Some(pb::turn_event::Kind::Stdout(b)) => bytes += b.len() as u64,
            Some(pb::turn_event::Kind::Exited(e)) => {
                let end = Instant::now();
                if e.reason != pb::exited::Reason::Exited as i32 {
                    return Err(format!("turn ended: {e:?}"));
                }
                let started = started.ok_or("exited before started")?;
                return Ok((started - t0, end - started, bytes, spawn_us));
            }
            _ => {}
        }
    }
    Err("stream ended without exited".into())
}

async fn run(args: &[String]) -> Result<(), String> {
    let usage = "usage: client_peer SOCKET (start N SESSION | relay N SESSION BYTES)";
    let [socket, what, n, session, rest @ ..] = args else {
        return Err(usage.into());
    };
    let n: usize = n.parse().map_err(|_| format!("N: {usage}"))?;
    let (argv, want): (Vec<String>, Option<u64>) = match (what.as_str(), rest) {
        ("start", []) => (vec!["/bin/true".into()], None),
        ("relay", [bytes]) => {
            let b: u64 = bytes.parse().map_err(|_| format!("BYTES: {usage}"))?;
            (
                vec![
                    "/usr/bin/head".into(),
                    "-c".into(),
                    b.to_string(),
                    "/dev/zero".into(),
                ],
                Some(b),
            )
        }
        _ => return Err(usage.into()),
    };
    let channel = connect_unix(socket.clone())
        .await
        .map_err(|e| format!("cannot reach {socket}: {e}"))?;
    let mut client = pb::broker_client::BrokerClient::new(channel)
        .max_decoding_message_size(turnstile_client::MAX_MESSAGE);
    turn(&mut client, session, &argv).await?;
    for _ in 0..n {
        let (start, relay, bytes, spawn_us) = turn(&mut client, session, &argv).await?;
        if let Some(want) = want {
            if bytes != want {
                return Err(format!("relayed {bytes} bytes, want {want}"));
            }
            println!("{}", relay.as_micros());
        } else {
            println!("{} {spawn_us}", start.as_micros());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("client_peer: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client_peer: {e}");
            ExitCode::FAILURE
        }
    }
}
