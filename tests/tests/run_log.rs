//! Run logs: atomic batches, no lost lines under many writers, followers, bad input.

use entity::run;
use run_domain::{
    AppendReceipt, Changes, LogCursor, LogEntry, LogError, VersionedUpdate, append_run_log,
    append_run_logs, append_run_logs_idempotent, read_run_log, read_run_log_after,
};
use run_engine_tests::{Backend, RunFactory, TestDb, each_backend};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Barrier;
use uuid::Uuid;

const WRITERS: usize = 16;
const LINES: usize = 500;

async fn new_run(db: &DatabaseConnection) -> run::Model {
    RunFactory::new().key("log").epics(0).create(db).await.run
}

/// Reads every line after `cursor` in pages, as a follower would.
async fn read_all(db: &DatabaseConnection, run_id: Uuid) -> Vec<LogEntry> {
    let mut out = Vec::new();
    let mut cursor = LogCursor::START;
    loop {
        let page = read_run_log_after(db, run_id, cursor, 777)
            .await
            .expect("read page");
        if page.entries.is_empty() {
            return out;
        }
        cursor = page.next;
        out.extend(page.entries);
    }
}

/// Writer `w` appends lines `w:0..LINES`, in batches of 1..=7 lines (its own rhythm).
async fn write_lines(db: DatabaseConnection, run_id: Uuid, w: usize) -> Vec<(usize, usize)> {
    let mut batches = Vec::new();
    let mut i = 0;
    while i < LINES {
        let size = 1 + (w + i) % 7;
        let end = (i + size).min(LINES);
        let lines: Vec<String> = (i..end).map(|n| format!("w{w:02}:{n:04}")).collect();
        if lines.len() == 1 {
            append_run_log(&db, run_id, &lines[0])
                .await
                .expect("append one");
        } else {
            append_run_logs(&db, run_id, &lines)
                .await
                .expect("append batch");
        }
        batches.push((i, end));
        i = end;
    }
    batches
}

each_backend! {
    /// 16 writers append 500 lines each, some in batches, while a follower tails the log.
    async fn sixteen_writers_lose_no_line_and_a_follower_sees_each_once(t) {
        let run = new_run(&t.db).await;
        let follower = {
            let db = t.db.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut cursor = LogCursor::START;
                let deadline = Instant::now() + Duration::from_secs(300);
                while seen.len() < WRITERS * LINES {
                    assert!(Instant::now() < deadline, "follower saw only {} lines", seen.len());
                    let page = read_run_log_after(&db, run.id, cursor, 500).await.expect("follow");
                    if page.entries.is_empty() {
                        // Poll interval: nothing new yet.
                        tokio::time::sleep(Duration::from_millis(2)).await;
                        continue;
                    }
                    cursor = page.next;
                    seen.extend(page.entries);
                }
                seen
            })
        };
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| tokio::spawn(write_lines(t.db.clone(), run.id, w)))
            .collect();
        let mut batches = Vec::new();
        for (w, h) in writers.into_iter().enumerate() {
            batches.push((w, h.await.expect("writer")));
        }
        let all = read_all(&t.db, run.id).await;
        assert_eq!(all.len(), WRITERS * LINES, "every line present");
        // Gap-free numbering.
        for (i, e) in all.iter().enumerate() {
            assert_eq!(e.seq, i as i64 + 1);
        }
        // Each line exactly once; each writer's order kept.
        let mut pos: HashMap<String, usize> = HashMap::new();
        for (i, e) in all.iter().enumerate() {
            assert!(pos.insert(e.message.clone(), i).is_none(), "duplicate line {}", e.message);
        }
        for w in 0..WRITERS {
            let order: Vec<usize> = (0..LINES).map(|n| pos[&format!("w{w:02}:{n:04}")]).collect();
            assert!(order.windows(2).all(|p| p[0] < p[1]), "writer {w} out of order");
        }
        // Each batch contiguous, one batch id, one timestamp.
        for (w, bs) in &batches {
            for (start, end) in bs {
                let at: Vec<&LogEntry> = (*start..*end).map(|n| &all[pos[&format!("w{w:02}:{n:04}")]]).collect();
                assert!(at.windows(2).all(|p| p[1].seq == p[0].seq + 1), "batch not contiguous");
                assert!(at.iter().all(|e| e.batch_id == at[0].batch_id && e.logged_at == at[0].logged_at));
            }
        }
        let seen = follower.await.expect("follower");
        assert_eq!(seen, all, "the follower saw every line exactly once, in order");
    }
}

/// A scratch table holding a run's log as one text column, as the naive design would.
async fn naive_log_table(db: &DatabaseConnection) {
    let ddl = match db.get_database_backend() {
        DbBackend::MySql => "CREATE TABLE naive_log (id INT PRIMARY KEY, logs LONGTEXT NOT NULL)",
        _ => "CREATE TABLE naive_log (id INTEGER PRIMARY KEY, logs TEXT NOT NULL)",
    };
    db.execute_unprepared(ddl).await.expect("create naive_log");
    db.execute_unprepared("INSERT INTO naive_log (id, logs) VALUES (1, '')")
        .await
        .expect("seed");
}

async fn naive_read(db: &DatabaseConnection) -> String {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT logs FROM naive_log WHERE id = 1",
        ))
        .await
        .expect("read")
        .expect("row");
    row.try_get("", "logs").expect("logs")
}

each_backend! {
    /// The same load as read-then-write appends to a text column loses lines: the check bites.
    async fn sixteen_writers_lose_lines_with_read_then_write_appends(t) {
        naive_log_table(&t.db).await;
        let barrier = Arc::new(Barrier::new(WRITERS));
        let mut handles = Vec::new();
        for w in 0..WRITERS {
            let (db, barrier) = (t.db.clone(), barrier.clone());
            handles.push(tokio::spawn(async move {
                let backend = db.get_database_backend();
                let mut i = 0;
                while i < LINES {
                    let end = (i + 1 + (w + i) % 7).min(LINES);
                    let lines: String = (i..end).map(|n| format!("w{w:02}:{n:04}\n")).collect();
                    let current = naive_read(&db).await;
                    if i == 0 {
                        barrier.wait().await;
                    }
                    let sql = match backend {
                        DbBackend::Postgres => "UPDATE naive_log SET logs = $1 WHERE id = 1",
                        _ => "UPDATE naive_log SET logs = ? WHERE id = 1",
                    };
                    db.execute_raw(Statement::from_sql_and_values(backend, sql, [format!("{current}{lines}").into()]))
                        .await
                        .expect("write");
                    i = end;
                }
            }));
        }
        for h in handles {
            h.await.expect("writer");
        }
        let kept = naive_read(&t.db).await.lines().count();
        assert!(
            kept <= WRITERS * LINES - (WRITERS - 1),
            "read-then-write should lose at least the barrier round's lines; kept {kept} of {}",
            WRITERS * LINES
        );
    }
}

each_backend! {
    async fn odd_bytes_and_a_one_mebibyte_line_read_back_exactly(t) {
        let run = new_run(&t.db).await;
        let big: String = "x".repeat(1 << 20);
        let odd = [
            "nul \0 in the middle\0",
            "control \u{1} \u{7} \u{1b}[31m red \r carriage",
            "unicode: żółć 日本 🚀",
            "'; DROP TABLE run; --",
            "",
            big.as_str(),
        ];
        append_run_logs(&t.db, run.id, odd).await.expect("append odd lines");
        let back = read_all(&t.db, run.id).await;
        let messages: Vec<&str> = back.iter().map(|e| e.message.as_str()).collect();
        assert_eq!(messages, odd);
        // The schema is untouched by the injection attempt.
        assert!(run::Entity::find_versioned(&t.db, run.id).await.is_ok());
    }
}

each_backend! {
    async fn unknown_runs_are_not_found_and_empty_batches_do_nothing(t) {
        let missing = Uuid::new_v4();
        assert!(matches!(append_run_log(&t.db, missing, "x").await, Err(LogError::RunNotFound { run_id }) if run_id == missing));
        assert!(matches!(read_run_log(&t.db, missing).await, Err(LogError::RunNotFound { .. })));
        assert!(matches!(read_run_log_after(&t.db, missing, LogCursor::START, 10).await, Err(LogError::RunNotFound { .. })));
        let run = new_run(&t.db).await;
        let receipt = append_run_logs(&t.db, run.id, Vec::<String>::new()).await.expect("empty batch");
        assert!(!receipt.written);
        assert_eq!(read_run_log(&t.db, run.id).await.expect("read"), "");
    }
}

each_backend! {
    async fn the_whole_log_reads_as_timestamped_lines(t) {
        let run = new_run(&t.db).await;
        append_run_logs(&t.db, run.id, ["first", "second"]).await.expect("append");
        append_run_log(&t.db, run.id, "third").await.expect("append");
        let text = read_run_log(&t.db, run.id).await.expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for (line, msg) in lines.iter().zip(["first", "second", "third"]) {
            // [YYYY-MM-DDTHH:MM:SS.mmmZ] msg
            assert_eq!(line.len(), 27 + msg.len(), "{line}");
            assert!(line.starts_with('[') && line[1..25].ends_with('Z') && &line[25..27] == "] ", "{line}");
            assert_eq!(&line[24..25], "Z");
            assert_eq!(&line[20..21], ".");
            assert!(chrono::DateTime::parse_from_rfc3339(&line[1..25]).is_ok(), "{line}");
            assert!(line.ends_with(msg));
        }
    }
}

each_backend! {
    async fn appends_never_change_the_run_nor_fail_its_compare_and_swap(t) {
        let run = new_run(&t.db).await;
        let writer = {
            let db = t.db.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    append_run_logs(&db, run.id, [format!("line {i}"), format!("more {i}")]).await.expect("append");
                }
            })
        };
        // Compare-and-swap on the run, with the version read before the appends, while they run.
        let mut current = run.clone();
        for n in 0..20 {
            current = run::Entity::update_versioned(&t.db, run.id, current.version,
                Changes::new().set(run::Column::Title, format!("title {n}")))
                .await
                .expect("appends must not make the run's compare-and-swap fail");
        }
        writer.await.expect("writer");
        let after = run::Entity::find_versioned(&t.db, run.id).await.expect("read");
        assert_eq!(after.version, 21, "only our 20 updates changed the version");
    }
}

each_backend! {
    async fn a_retried_batch_id_is_written_once(t) {
        let run = new_run(&t.db).await;
        let batch = Uuid::new_v4();
        let first = append_run_logs_idempotent(&t.db, run.id, batch, ["a", "b"]).await.expect("first try");
        append_run_log(&t.db, run.id, "between").await.expect("other line");
        let again = append_run_logs_idempotent(&t.db, run.id, batch, ["a", "b"]).await.expect("retry");
        assert!(first.written && !again.written);
        assert_eq!((again.first_seq, again.last_seq), (first.first_seq, first.last_seq));
        let msgs: Vec<String> = read_all(&t.db, run.id).await.into_iter().map(|e| e.message).collect();
        assert_eq!(msgs, ["a", "b", "between"]);
        let other = new_run(&t.db).await;
        assert!(matches!(
            append_run_logs_idempotent(&t.db, other.id, batch, ["a", "b"]).await,
            Err(LogError::BatchMismatch { .. })
        ));
    }
}

each_backend! {
    async fn a_run_made_without_a_log_head_gets_one_on_first_append(t) {
        let run = new_run(&t.db).await;
        t.db.execute_unprepared("DELETE FROM run_log_head").await.expect("drop heads");
        append_run_logs(&t.db, run.id, ["one", "two"]).await.expect("append creates the head");
        append_run_log(&t.db, run.id, "three").await.expect("append");
        let seqs: Vec<i64> = read_all(&t.db, run.id).await.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, 3]);
    }
}

/// Deleting a run deletes its log (cascade through the head).
#[tokio::test]
async fn deleting_a_run_deletes_its_log_on_sqlite() {
    let Some(t) = TestDb::migrated(Backend::Sqlite).await else {
        return;
    };
    let run = new_run(&t.db).await;
    append_run_log(&t.db, run.id, "x").await.expect("append");
    run::Entity::delete_versioned(&t.db, run.id, run.version)
        .await
        .expect("delete");
    assert_eq!(run_engine_tests::count_rows(&t.db, "run_log").await, 0);
}

each_backend! {
    /// A batch id appended again must be the same batch: another count of lines, or the same
    /// count with one line changed, is refused and writes nothing; a true replay gets exactly
    /// the first try's receipt.
    async fn a_reused_batch_id_with_other_lines_is_refused_and_a_replay_gets_the_first_receipt(t) {
        let run = new_run(&t.db).await;
        let batch = Uuid::new_v4();
        let first = append_run_logs_idempotent(&t.db, run.id, batch, ["a", "b", "c"])
            .await
            .expect("first try");
        append_run_logs(&t.db, run.id, ["x", "y"]).await.expect("another batch");
        for other in [
            vec!["1", "2", "3", "4", "5"],
            vec!["a", "b", "C"],
            vec!["a", "b"],
            vec!["ab", "c", ""],
        ] {
            match append_run_logs_idempotent(&t.db, run.id, batch, &other).await {
                Err(LogError::BatchMismatch { batch_id }) => assert_eq!(batch_id, batch),
                got => panic!("{other:?}: expected BatchMismatch, got {got:?}"),
            }
        }
        let replay = append_run_logs_idempotent(&t.db, run.id, batch, ["a", "b", "c"])
            .await
            .expect("replay");
        assert_eq!(replay, AppendReceipt { written: false, ..first.clone() });
        let msgs: Vec<String> = read_all(&t.db, run.id).await.into_iter().map(|e| e.message).collect();
        assert_eq!(msgs, ["a", "b", "c", "x", "y"], "nothing written by the refused tries");

        // A batch written before batches carried a digest is checked against its lines.
        let old = Uuid::new_v4();
        let first = append_run_logs_idempotent(&t.db, run.id, old, ["p", "q"]).await.expect("old");
        t.db.execute_unprepared("UPDATE run_log SET batch_digest = NULL").await.expect("strip");
        assert!(matches!(
            append_run_logs_idempotent(&t.db, run.id, old, ["p", "Q"]).await,
            Err(LogError::BatchMismatch { .. })
        ));
        let replay = append_run_logs_idempotent(&t.db, run.id, old, ["p", "q"]).await.expect("replay");
        assert_eq!(replay, AppendReceipt { written: false, ..first });
    }
}

/// A connection pool of one connection, so that a session setting made on it holds for every
/// statement sent through it.
async fn one_connection(t: &TestDb) -> DatabaseConnection {
    let mut opts = sea_orm::ConnectOptions::new(t.url.clone());
    opts.max_connections(1)
        .min_connections(1)
        .sqlx_logging(false);
    if t.backend == Backend::Sqlite {
        // Give up on a held lock after 1 s instead of the default 60 s.
        opts.map_sqlx_sqlite_opts(|o| o.busy_timeout(Duration::from_secs(1)));
    }
    let db = sea_orm::Database::connect(opts).await.expect("connect one");
    let short_lock_wait = match t.backend {
        Backend::Postgres => Some("SET lock_timeout = '1s'"),
        Backend::MySql => Some("SET SESSION innodb_lock_wait_timeout = 1"),
        Backend::Sqlite => None,
    };
    if let Some(sql) = short_lock_wait {
        db.execute_unprepared(sql).await.expect("short lock wait");
    }
    db
}

/// Holds the run's log head locked in a transaction of its own for `hold`, as a writer stalled
/// inside its append would; returns once the lock is taken, and the task that lets it go.
async fn hold_log_head(t: &TestDb, run_id: Uuid, hold: Duration) -> tokio::task::JoinHandle<()> {
    let db = t.reconnect().await;
    let backend = t.db_backend();
    let (taken, is_taken) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        use sea_orm::TransactionTrait;
        let tx = match backend {
            DbBackend::Sqlite => {
                db.begin_with_options(sea_orm::TransactionOptions {
                    isolation_level: None,
                    access_mode: None,
                    sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                })
                .await
            }
            _ => db.begin().await,
        }
        .expect("begin");
        let sql = "UPDATE run_log_head SET last_seq = last_seq WHERE run_id = ?";
        let (sql, id) = match backend {
            DbBackend::Postgres => (sql.replace('?', "$1"), run_id.into()),
            _ => (sql.to_owned(), run_id.into()),
        };
        tx.execute_raw(Statement::from_sql_and_values(backend, sql, [id]))
            .await
            .expect("lock the head");
        let _ = taken.send(());
        // The stall itself: the lock is held for this long, whatever the others do.
        tokio::time::sleep(hold).await;
        tx.rollback().await.expect("let go");
    });
    is_taken.await.expect("the head is locked");
    task
}

each_backend! {
    /// A writer that holds the log head past the others' lock-wait timeout delays their lines,
    /// never drops them: the timeout is transient and the append tries again. The same hold
    /// makes a plain statement on the head fail with that timeout, so the test can fail.
    async fn a_lock_wait_timeout_on_the_log_head_delays_lines_and_loses_none(t) {
        let run = new_run(&t.db).await;
        append_run_log(&t.db, run.id, "before").await.expect("first line");
        let db = one_connection(&t).await;

        // The unsafe way: one try, no retry. It meets the timeout.
        let holder = hold_log_head(&t, run.id, Duration::from_secs(3)).await;
        let plain = db
            .execute_unprepared(&format!(
                "UPDATE run_log_head SET last_seq = last_seq WHERE run_id = {}",
                match t.backend {
                    Backend::Postgres => format!("'{}'", run.id),
                    Backend::MySql => format!("UNHEX('{}')", run.id.simple()),
                    Backend::Sqlite => format!("X'{}'", run.id.simple()),
                }
            ))
            .await;
        let err = plain.expect_err("a plain statement times out behind the held head");
        assert!(run_domain::is_transient(&err), "{:?}: the lock-wait timeout is transient: {err}", t.backend);
        holder.await.expect("holder");

        // The append behind the same hold: delayed, then written, once.
        let holder = hold_log_head(&t, run.id, Duration::from_secs(3)).await;
        let receipt = append_run_logs(&db, run.id, ["started", "hello s1"])
            .await
            .expect("the append rides out the lock-wait timeout");
        assert!(receipt.written);
        holder.await.expect("holder");
        let msgs: Vec<String> = read_all(&t.db, run.id).await.into_iter().map(|e| e.message).collect();
        assert_eq!(msgs, ["before", "started", "hello s1"]);
    }
}

each_backend! {
    /// Appends that take the one-statement path (a fresh batch) and the transaction (a batch
    /// appended under an id a caller chose, which looks for an earlier try first), from eight
    /// connections at once: every line numbered once, 1 to N without a gap, the head at N, and
    /// timestamps that never go back as `seq` goes up.
    async fn one_statement_and_transactional_appends_share_one_numbering(t) {
        let run = new_run(&t.db).await;
        let barrier = Arc::new(Barrier::new(8));
        let mut tasks = Vec::new();
        for w in 0..8usize {
            let db = run_domain::connect(&t.url).await.expect("connect");
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                for i in 0..40usize {
                    let lines = [format!("{w}:{i}:a"), format!("{w}:{i}:b")];
                    if (w + i) % 2 == 0 {
                        append_run_logs(&db, run.id, &lines).await.expect("append");
                    } else {
                        append_run_logs_idempotent(&db, run.id, Uuid::new_v4(), &lines)
                            .await
                            .expect("append by id");
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("writer");
        }
        let lines = read_all(&t.db, run.id).await;
        assert_eq!(lines.len(), 8 * 40 * 2);
        for (k, line) in lines.iter().enumerate() {
            assert_eq!(line.seq, k as i64 + 1, "gap-free numbering");
        }
        for pair in lines.windows(2) {
            assert!(pair[0].logged_at <= pair[1].logged_at, "time went back: {pair:?}");
        }
        let head = <entity::run_log_head::Entity as sea_orm::EntityTrait>::find_by_id(run.id)
            .one(&t.db)
            .await
            .expect("head")
            .expect("row");
        assert_eq!(head.last_seq, lines.len() as i64);
    }
}
