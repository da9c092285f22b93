//! Database faults under the domain API, on a private server the test may kill and restart:
//! appends lose no line and write none twice while connections are killed and the server
//! restarts.

use run_domain::{LogCursor, append_run_logs_idempotent, read_run_log_after};
use run_engine_tests::private_server::PrivateServer;
use run_engine_tests::{Backend, RunFactory, TestDb};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use uuid::Uuid;

async fn appends_survive(backend: Backend) {
    if backend.server_url().is_none() {
        return; // this backend is not under test here (outside CI)
    }
    let mut server = match backend {
        Backend::Postgres => PrivateServer::postgres(),
        _ => PrivateServer::mariadb(),
    }
    .unwrap_or_else(|e| panic!("{backend:?}: cannot start a private server: {e}"));
    let t = TestDb::migrated_on(&server).await;
    let run = RunFactory::new()
        .key("faults")
        .epics(0)
        .create(&t.db)
        .await
        .run;
    let admin_url = server.url();
    let name = run_engine_tests::private_server::database_name(&t.url);

    const WRITERS: usize = 4;
    const BATCHES: usize = 150;
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    let killer = {
        let (stop, kills, admin_url, name) =
            (stop.clone(), kills.clone(), admin_url.clone(), name.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(admin) = run_domain::connect(&admin_url).await {
                    kills.fetch_add(
                        run_engine_tests::private_server::kill_connections(&admin, &name).await,
                        Ordering::SeqCst,
                    );
                    admin.close().await.ok();
                }
                // Fault cadence, not synchronisation.
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let db = t.db.clone();
        writers.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                let lines = [format!("w{w}:b{b}:0"), format!("w{w}:b{b}:1")];
                append_run_logs_idempotent(&db, run.id, Uuid::new_v4(), &lines)
                    .await
                    .unwrap_or_else(|e| panic!("append w{w} b{b} failed for good: {e}"));
            }
        }));
    }
    // Restart the server once, while the writers run.
    let progress = {
        let db = t.db.clone();
        move || {
            let db = db.clone();
            async move {
                read_run_log_after(&db, run.id, LogCursor::START, 1_000_000)
                    .await
                    .map(|p| p.entries.len())
                    .unwrap_or(0)
            }
        }
    };
    while progress().await < WRITERS * BATCHES / 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server = tokio::task::spawn_blocking(move || server.restart().map(|()| server))
        .await
        .expect("restart task")
        .unwrap_or_else(|e| panic!("{backend:?}: restart failed: {e}"));
    let restarts = 1;
    for w in writers {
        w.await.expect("writer");
    }
    stop.store(true, Ordering::SeqCst);
    killer.await.expect("killer");

    let entries = read_run_log_after(&t.db, run.id, LogCursor::START, 1_000_000)
        .await
        .expect("read back")
        .entries;
    let mut count: HashMap<&str, usize> = HashMap::new();
    for e in &entries {
        *count.entry(e.message.as_str()).or_default() += 1;
    }
    let expected = WRITERS * BATCHES * 2;
    let lost = (0..WRITERS)
        .flat_map(|w| (0..BATCHES).flat_map(move |b| (0..2).map(move |l| format!("w{w}:b{b}:{l}"))))
        .filter(|m| !count.contains_key(m.as_str()))
        .count();
    let doubled = count.values().filter(|&&n| n > 1).count();
    println!(
        "{backend:?}: connections killed {}, restarts {restarts}, lines {} of {expected}, lost {lost}, written twice {doubled}",
        kills.load(Ordering::SeqCst),
        entries.len()
    );
    assert!(
        kills.load(Ordering::SeqCst) > 0,
        "the test must actually kill connections"
    );
    assert_eq!((lost, doubled), (0, 0), "no line lost, none written twice");
    assert_eq!(entries.len(), expected);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1, "gap-free after faults");
    }
    drop(t);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_survive_killed_connections_and_a_restart_on_postgres() {
    appends_survive(Backend::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_survive_killed_connections_and_a_restart_on_mariadb() {
    appends_survive(Backend::MySql).await;
}
