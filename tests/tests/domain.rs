//! Compare-and-swap, transitions and retries, on every backend.

use entity::{run, run_story};
use run_domain::{
    Changes, ConcurrencyError, RetryPolicy, RunStatus, StoryStatus, TransitionError,
    VersionedUpdate, retry, transition, update_with_retry,
};
use run_engine_tests::{RunFactory, each_backend};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::sync::Barrier;
use uuid::Uuid;

const TASKS: usize = 32;
const INCREMENTS: i32 = 4;

each_backend! {
    /// 32 tasks all read the counter, then all write it (a barrier lines them up), then go on
    /// incrementing with retries: compare-and-swap loses nothing.
    async fn thirty_two_racing_tasks_lose_no_increment_with_compare_and_swap(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let barrier = Arc::new(Barrier::new(TASKS));
        let successes = Arc::new(AtomicU32::new(0));
        let conflicts = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (db, barrier, successes, conflicts) =
                (t.db.clone(), barrier.clone(), successes.clone(), conflicts.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..INCREMENTS {
                    let mut current = run_story::Entity::find_versioned(&db, story.id).await.expect("read");
                    if i == 0 {
                        barrier.wait().await;
                    }
                    loop {
                        let changes = Changes::new().set(run_story::Column::Attempts, current.attempts + 1);
                        match run_story::Entity::update_versioned(&db, story.id, current.version, changes).await {
                            Ok(_) => {
                                successes.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            Err(ConcurrencyError::Conflict { expected, actual, .. }) => {
                                assert!(actual > expected, "versions only grow");
                                conflicts.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(RetryPolicy::default().delay(2)).await;
                                current = run_story::Entity::find_versioned(&db, story.id).await.expect("re-read");
                            }
                            Err(e) => panic!("unexpected error: {e}"),
                        }
                    }
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let end = run_story::Entity::find_versioned(&t.db, story.id).await.expect("read");
        let successes = successes.load(Ordering::SeqCst) as i32;
        assert_eq!(successes, TASKS as i32 * INCREMENTS);
        assert_eq!(end.attempts, successes, "counter equals successes");
        assert_eq!(end.version - 1, successes, "final version minus one equals successes");
        assert!(conflicts.load(Ordering::SeqCst) >= TASKS as u32 - 1, "the barrier round conflicts");
    }
}

each_backend! {
    /// The same load written as read-then-write (no version check) loses increments.
    async fn thirty_two_racing_tasks_lose_increments_with_read_then_write(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let barrier = Arc::new(Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for _ in 0..TASKS {
            let (db, barrier) = (t.db.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..INCREMENTS {
                    let current = run_story::Entity::find_by_id(story.id).one(&db).await.expect("read").expect("row");
                    if i == 0 {
                        barrier.wait().await;
                    }
                    // The unsafe way: write what was read plus one, whatever happened since.
                    run_story::Entity::update(run_story::ActiveModel {
                        id: Set(story.id),
                        attempts: Set(current.attempts + 1),
                        ..Default::default()
                    })
                    .exec(&db)
                    .await
                    .expect("write");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let end = run_story::Entity::find_by_id(story.id).one(&t.db).await.expect("read").expect("row");
        let intended = TASKS as i32 * INCREMENTS;
        assert!(
            end.attempts <= intended - (TASKS as i32 - 1),
            "read-then-write should lose at least the barrier round's {} increments, counter = {} of {intended}",
            TASKS - 1,
            end.attempts
        );
    }
}

each_backend! {
    async fn two_writers_on_one_version_only_one_wins(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let a = run_story::Entity::update_versioned(&t.db, story.id, story.version,
            Changes::new().set(run_story::Column::Title, "a")).await;
        let b = run_story::Entity::update_versioned(&t.db, story.id, story.version,
            Changes::new().set(run_story::Column::Title, "b")).await;
        let a = a.expect("first writer wins");
        assert_eq!(a.version, story.version + 1);
        assert_eq!(a.title, "a");
        match b {
            Err(ConcurrencyError::Conflict { entity, id, expected, actual }) => {
                assert_eq!((entity, id, expected, actual), ("run_story", story.id, 1, 2));
            }
            other => panic!("second writer must conflict, got {other:?}"),
        }
        let now = run_story::Entity::find_versioned(&t.db, story.id).await.expect("read");
        assert_eq!(now.title, "a", "the loser changed nothing");
    }
}

each_backend! {
    async fn update_returns_the_written_row_and_bumps_version_and_updated_at(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let updated = run_story::Entity::update_versioned(&t.db, story.id, story.version,
            Changes::new().set(run_story::Column::Error, Some("boom".to_owned()))).await.expect("update");
        assert_eq!(updated.version, 2);
        assert_eq!(updated.error.as_deref(), Some("boom"));
        assert!(updated.updated_at >= story.updated_at);
        assert_eq!(updated, run_story::Entity::find_versioned(&t.db, story.id).await.expect("read"));
    }
}

each_backend! {
    async fn unknown_ids_stale_and_absurd_versions_get_typed_errors(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let missing = Uuid::new_v4();
        assert!(matches!(
            run_story::Entity::update_versioned(&t.db, missing, 1, Changes::new()).await,
            Err(ConcurrencyError::NotFound { entity: "run_story", id }) if id == missing
        ));
        assert!(matches!(
            run_story::Entity::find_versioned(&t.db, missing).await,
            Err(ConcurrencyError::NotFound { .. })
        ));
        for absurd in [-1, 0, i32::MAX, i32::MIN] {
            match run_story::Entity::update_versioned(&t.db, story.id, absurd, Changes::new()).await {
                Err(ConcurrencyError::Conflict { expected, actual, .. }) => {
                    assert_eq!((expected, actual), (absurd, 1));
                }
                other => panic!("version {absurd}: expected a conflict, got {other:?}"),
            }
        }
        let after = run_story::Entity::find_versioned(&t.db, story.id).await.expect("read");
        assert_eq!(after, story, "nothing was harmed");
    }
}

each_backend! {
    async fn version_status_and_id_cannot_be_set_directly(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        for (changes, column) in [
            (Changes::new().set(run_story::Column::Version, 99), "version"),
            (Changes::new().set(run_story::Column::Status, "completed"), "status"),
            (Changes::new().set(run_story::Column::Id, Uuid::new_v4()), "id"),
        ] {
            match run_story::Entity::update_versioned(&t.db, story.id, story.version, changes).await {
                Err(ConcurrencyError::ReservedColumn { column: c, .. }) => assert_eq!(c, column),
                other => panic!("{column}: expected ReservedColumn, got {other:?}"),
            }
        }
        assert_eq!(run_story::Entity::find_versioned(&t.db, story.id).await.expect("read"), story);
    }
}

each_backend! {
    async fn delete_is_guarded_by_the_version(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        assert!(matches!(
            run_story::Entity::delete_versioned(&t.db, story.id, story.version + 5).await,
            Err(ConcurrencyError::Conflict { actual: 1, .. })
        ));
        run_story::Entity::delete_versioned(&t.db, story.id, story.version).await.expect("delete");
        assert!(matches!(
            run_story::Entity::delete_versioned(&t.db, story.id, story.version).await,
            Err(ConcurrencyError::NotFound { .. })
        ));
    }
}

each_backend! {
    async fn illegal_transitions_are_refused_before_the_database(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let err = transition::<run_story::Entity, _>(&t.db, &story, StoryStatus::Completed)
            .await
            .expect_err("pending cannot complete");
        assert!(matches!(err, TransitionError::Illegal { ref from, ref to, .. } if from == "pending" && to == "completed"));
        assert_eq!(run_story::Entity::find_versioned(&t.db, story.id).await.expect("read"), story);

        let running = transition::<run_story::Entity, _>(&t.db, &story, StoryStatus::Running).await.expect("start");
        assert_eq!((running.status.as_str(), running.version), ("running", 2));
        assert!(running.started_at.is_some() && running.finished_at.is_none());
        // A stale copy cannot make a legal change either.
        assert!(transition::<run_story::Entity, _>(&t.db, &story, StoryStatus::Cancelled).await
            .expect_err("stale").is_conflict());
        let done = transition::<run_story::Entity, _>(&t.db, &running, StoryStatus::Completed).await.expect("complete");
        assert!(done.finished_at.is_some());
        assert!(matches!(
            transition::<run_story::Entity, _>(&t.db, &done, StoryStatus::Running).await,
            Err(TransitionError::Illegal { .. })
        ));
    }
}

each_backend! {
    async fn a_row_with_an_unknown_status_is_reported_not_changed(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        run_story::Entity::update_many()
            .col_expr(run_story::Column::Status, sea_orm::sea_query::Expr::val("exploded"))
            .filter(run_story::Column::Id.eq(story.id))
            .exec(&t.db).await.expect("corrupt on purpose");
        let odd = run_story::Entity::find_versioned(&t.db, story.id).await.expect("read");
        assert!(matches!(
            transition::<run_story::Entity, _>(&t.db, &odd, StoryStatus::Running).await,
            Err(TransitionError::UnknownStatus { ref found, .. }) if found == "exploded"
        ));
    }
}

each_backend! {
    async fn retry_gives_up_after_its_attempts_with_the_last_conflict(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let calls = AtomicU32::new(0);
        let policy = RetryPolicy::attempts(3);
        let result = retry(&policy, |_| async {
            calls.fetch_add(1, Ordering::SeqCst);
            let stale = run_story::Entity::find_versioned(&t.db, story.id).await?;
            // Someone else always gets there first.
            run_story::Entity::update_versioned(&t.db, story.id, stale.version, Changes::new()).await?;
            run_story::Entity::update_versioned(&t.db, story.id, stale.version, Changes::new()).await
        }).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        match result {
            Err(ConcurrencyError::Conflict { expected, actual, .. }) => assert_eq!(actual, expected + 1),
            other => panic!("expected the last conflict, got {other:?}"),
        }
    }
}

each_backend! {
    async fn update_with_retry_reapplies_the_change_to_the_fresh_row(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let mut first = true;
        let db2 = t.db.clone();
        let id = story.id;
        let updated = update_with_retry::<run_story::Entity, _, _>(&t.db, id, &RetryPolicy::default(), |s| {
            if first {
                first = false;
                // Make this first read stale before it is written.
                let db2 = db2.clone();
                let v = s.version;
                std::thread::spawn(move || {
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt")
                        .block_on(run_story::Entity::update_versioned(&db2, id, v,
                            Changes::new().set(run_story::Column::Attempts, 10)))
                }).join().expect("thread").expect("interfering update");
            }
            Changes::new().set(run_story::Column::Attempts, s.attempts + 1)
        }).await.expect("retry");
        assert_eq!(updated.attempts, 11, "applied to the row the interferer wrote");
        assert_eq!(updated.version, 3);
    }
}

each_backend! {
    async fn runs_follow_their_lifecycle(t) {
        let run = RunFactory::new().epics(0).create(&t.db).await.run;
        assert_eq!((run.status.as_str(), run.version), ("pending", 1));
        let running = transition::<run::Entity, _>(&t.db, &run, RunStatus::Running).await.expect("start");
        let cancelled = transition::<run::Entity, _>(&t.db, &running, RunStatus::Cancelled).await.expect("cancel");
        assert_eq!(cancelled.version, 3);
        assert!(transition::<run::Entity, _>(&t.db, &cancelled, RunStatus::Running).await.is_err());
    }
}

each_backend! {
    async fn extra_changes_of_a_transition_override_its_defaults(t) {
        let story = run_engine_tests::new_story(&t.db).await;
        let when: chrono::DateTime<chrono::Utc> = "2030-01-02T03:04:05Z".parse().expect("time");
        let running = run_domain::transition_with::<run_story::Entity, _>(
            &t.db,
            &story,
            StoryStatus::Running,
            Changes::new()
                .set(run_story::Column::StartedAt, when)
                .set(run_story::Column::LeaseOwner, Some("worker-1".to_owned())),
        )
        .await
        .expect("claim");
        assert_eq!(running.started_at, Some(when));
        assert_eq!(running.lease_owner.as_deref(), Some("worker-1"));
        assert!(matches!(
            run_domain::transition_with::<run_story::Entity, _>(&t.db, &running, StoryStatus::Completed,
                Changes::new().set(run_story::Column::Version, 1)).await,
            Err(TransitionError::Concurrency(ConcurrencyError::ReservedColumn { .. }))
        ));
    }
}

/// Inside a transaction that has already read the row, another connection changes it: a stale
/// compare-and-swap in the transaction reports the version the row holds now (not the one the
/// transaction's snapshot holds), and `update_with_retry` in the transaction succeeds. On
/// MariaDB (REPEATABLE READ) a plain read would see the snapshot; PostgreSQL reads committed
/// rows per statement. (SQLite refuses a write from a stale snapshot outright.)
async fn a_stale_update_inside_a_transaction_sees_the_current_version(
    backend: run_engine_tests::Backend,
) {
    use sea_orm::TransactionTrait;
    let Some(t) = run_engine_tests::TestDb::migrated(backend).await else {
        return;
    };
    let story = run_engine_tests::new_story(&t.db).await;
    let other = t.reconnect().await;

    let txn = t.db.begin().await.expect("begin");
    let seen = run_story::Entity::find_versioned(&txn, story.id)
        .await
        .expect("read in txn");
    assert_eq!(seen.version, 1);
    run_story::Entity::update_versioned(
        &other,
        story.id,
        1,
        Changes::new().set(run_story::Column::Title, "other"),
    )
    .await
    .expect("the other connection bumps it to 2");
    match run_story::Entity::update_versioned(
        &txn,
        story.id,
        1,
        Changes::new().set(run_story::Column::Title, "stale"),
    )
    .await
    {
        Err(ConcurrencyError::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!(
                (expected, actual),
                (1, 2),
                "{backend:?}: the version found now"
            );
        }
        got => panic!("{backend:?}: expected a conflict, got {got:?}"),
    }
    let written = update_with_retry::<run_story::Entity, _, _>(
        &txn,
        story.id,
        &RetryPolicy::attempts(4),
        |s| Changes::new().set(run_story::Column::Attempts, s.attempts + 1),
    )
    .await
    .unwrap_or_else(|e| panic!("{backend:?}: update_with_retry inside a transaction: {e}"));
    assert_eq!(written.version, 3);
    assert_eq!(
        written.title, "other",
        "{backend:?}: built on the current row"
    );
    txn.commit().await.expect("commit");
    let now = run_story::Entity::find_versioned(&t.db, story.id)
        .await
        .expect("read");
    assert_eq!((now.version, now.attempts), (3, story.attempts + 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_update_inside_a_transaction_sees_the_current_version_on_mysql() {
    a_stale_update_inside_a_transaction_sees_the_current_version(run_engine_tests::Backend::MySql)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_update_inside_a_transaction_sees_the_current_version_on_postgres() {
    a_stale_update_inside_a_transaction_sees_the_current_version(
        run_engine_tests::Backend::Postgres,
    )
    .await;
}
