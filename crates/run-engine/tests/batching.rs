//! Batched claims and completions, on every backend: a claim of many stories in one statement
//! from many connections at once hands each story out once, where a read-then-write batch
//! under the same load hands some out twice; a batched completion holding a story that was
//! taken over records the others and leaves that one to its new holder, where completing by id
//! alone overwrites it; and several executors claiming in batches run every story once.

use async_trait::async_trait;
use chrono::Utc;
use entity::run_story;
use run_domain::batch::{complete_running, start_ready, started_by};
use run_engine::{
    Executor, ExecutorConfig, Lease, StoryContext, StoryHandler, StoryOutcome, TryClaim, try_claim,
};
use run_engine_tests::{RunFactory, each_backend};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Barrier;
use uuid::Uuid;

const CLAIMERS: usize = 8;
const STORIES: usize = 200;

async fn run_of(db: &DatabaseConnection, stories: usize) -> Uuid {
    RunFactory::new()
        .key("batch")
        .epics(2)
        .stories(stories / 2)
        .max_attempts(3)
        .create(db)
        .await
        .id()
}

async fn stories_of(db: &DatabaseConnection, run_id: Uuid) -> Vec<run_story::Model> {
    run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .order_by_asc(run_story::Column::Position)
        .all(db)
        .await
        .expect("read stories")
}

/// `CLAIMERS` tasks, each on a connection of its own, claim batches of 8 until nothing is
/// left, all starting together; `claim` is the batched claim under test (it returns the ids it
/// got). Returns how often each story was handed out.
async fn claim_all<F, Fut>(url: &str, claim: F) -> HashMap<Uuid, u32>
where
    F: Fn(DatabaseConnection, String) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Vec<Uuid>> + Send,
{
    let handed = Arc::new(Mutex::new(HashMap::<Uuid, u32>::new()));
    let barrier = Arc::new(Barrier::new(CLAIMERS));
    let mut tasks = Vec::new();
    for w in 0..CLAIMERS {
        let db = run_domain::connect(url).await.expect("connect");
        let (claim, handed, barrier) = (claim.clone(), handed.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            loop {
                let got = claim(db.clone(), format!("claimer-{w}")).await;
                if got.is_empty() {
                    break;
                }
                let mut h = handed.lock().expect("lock");
                for id in got {
                    *h.entry(id).or_insert(0) += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("claimer");
    }
    handed.lock().map(|h| h.clone()).expect("lock")
}

/// A batch claim that is not one: read the first pending stories, then write them by id alone.
async fn read_then_write(db: DatabaseConnection, run_id: Uuid, owner: String) -> Vec<Uuid> {
    let picked: Vec<Uuid> = run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .filter(run_story::Column::Status.eq("pending"))
        .order_by_asc(run_story::Column::Position)
        .all(&db)
        .await
        .unwrap_or_default()
        .into_iter()
        .take(8)
        .map(|s| s.id)
        .collect();
    // Other claimers read the same rows meanwhile.
    tokio::task::yield_now().await;
    for id in &picked {
        let _ = run_story::Entity::update_many()
            .col_expr(run_story::Column::Status, Expr::val("running"))
            .col_expr(run_story::Column::LeaseOwner, Expr::val(owner.clone()))
            .col_expr(
                run_story::Column::Attempts,
                Expr::col(run_story::Column::Attempts).add(1),
            )
            .filter(run_story::Column::Id.eq(*id))
            .exec(&db)
            .await;
    }
    picked
}

each_backend! {
    /// Eight connections claim batches of up to 8 from 200 ready stories at once: every story
    /// is handed out exactly once, running with one attempt under the lease of the claimer
    /// that got it. The same load through a read-then-write batch hands stories out twice.
    async fn batched_claims_from_many_connections_hand_each_story_out_once(t) {
        let run_id = run_of(&t.db, STORIES).await;
        let until = Utc::now() + chrono::Duration::seconds(60);
        let handed = claim_all(&t.url, move |db, owner| async move {
            start_ready(&db, run_id, 8, &owner, until)
                .await
                .expect("batched claim")
                .into_iter()
                .map(|s| s.id)
                .collect()
        })
        .await;
        assert_eq!(handed.len(), STORIES, "every story was handed out");
        let twice: Vec<_> = handed.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "stories handed out more than once: {twice:?}");
        let all = stories_of(&t.db, run_id).await;
        for s in &all {
            assert_eq!((s.status.as_str(), s.attempts, s.version), ("running", 1, 2), "{}", s.key);
            assert_eq!(s.lease_expires_at.map(|t| t.timestamp_millis()), Some(until.timestamp_millis()));
        }
        let owners: std::collections::HashSet<_> = all.iter().filter_map(|s| s.lease_owner.clone()).collect();
        assert!(owners.len() > 1, "the claimers shared the stories: {owners:?}");
        // What a claim whose answer was lost wrote can be found by its owner and expiry.
        let owner = all[0].lease_owner.clone().expect("owner");
        let found = started_by(&t.db, run_id, &owner, until).await.expect("started_by");
        assert_eq!(found.len(), all.iter().filter(|s| s.lease_owner.as_deref() == Some(&owner)).count());

        // Control: the same load, read then written by id.
        let naive_run = run_of(&t.db, STORIES).await;
        let handed = claim_all(&t.url, move |db, owner| read_then_write(db, naive_run, owner)).await;
        let twice = handed.values().filter(|n| **n > 1).count();
        assert!(twice > 0, "the read-then-write batch should hand some story out twice");
    }
}

each_backend! {
    /// Three stories claimed in one batch, the second taken over after its lease ran out: a
    /// batched completion of all three from the versions the first holder knows records the
    /// first and third and leaves the second running under its new holder. Completing by id
    /// alone, the old holder overwrites the new one's story.
    async fn a_batched_completion_skips_a_story_taken_over_and_records_the_rest(t) {
        for fenced_way in [true, false] {
            let run_id = run_of(&t.db, 4).await;
            // A lease that has already run out, so that another worker may take over.
            let expired = Utc::now() - chrono::Duration::seconds(1);
            let held = start_ready(&t.db, run_id, 3, "old-holder", expired).await.expect("claim");
            assert_eq!(held.len(), 3);
            let taker = Lease::new("taker", Duration::from_secs(60));
            let claim = try_claim(&t.db, &held[1], &taker, Utc::now()).await.expect("take over");
            let TryClaim::Claimed(taken) = claim else { panic!("not taken over: {claim:?}") };
            assert_eq!(taken.taken_over_from.as_deref(), Some("old-holder"));

            if fenced_way {
                let written = complete_running(&t.db, &held).await.expect("batched completion");
                let mut ids: Vec<Uuid> = written.iter().map(|s| s.id).collect();
                ids.sort();
                let mut want = vec![held[0].id, held[2].id];
                want.sort();
                assert_eq!(ids, want, "the two stories still held were recorded, not the other");
                for s in &written {
                    assert_eq!((s.status.as_str(), s.version), ("completed", 3));
                    assert!(s.finished_at.is_some() && s.lease_expires_at.is_none());
                }
                let now = run_story::Entity::find_by_id(held[1].id).one(&t.db).await.expect("read").expect("row");
                assert_eq!(now, taken.story, "the taken-over story is untouched");
                assert_eq!(now.status, "running");
            } else {
                // Control: the same batch completed by id alone.
                run_story::Entity::update_many()
                    .col_expr(run_story::Column::Status, Expr::val("completed"))
                    .filter(run_story::Column::Id.is_in(held.iter().map(|s| s.id)))
                    .exec(&t.db)
                    .await
                    .expect("by id");
                let now = run_story::Entity::find_by_id(held[1].id).one(&t.db).await.expect("read").expect("row");
                assert_eq!(now.status, "completed", "by id alone, the old holder overwrote the taker's story");
                assert_eq!(now.lease_owner.as_deref(), Some("taker"));
            }
        }
    }
}

/// Counts how often each story is handled.
#[derive(Default, Clone)]
struct Counting(Arc<Mutex<HashMap<Uuid, u32>>>);

#[async_trait]
impl StoryHandler for Counting {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        if let Ok(mut runs) = self.0.lock() {
            *runs.entry(ctx.story.id).or_insert(0) += 1;
        }
        tokio::task::yield_now().await;
        StoryOutcome::Completed
    }
}

each_backend! {
    /// Three executors of eight workers each on one run of 300 stories, claiming and recording
    /// in batches: every story is handled once, completed with one attempt, the run completes,
    /// and the claims took fewer statements than stories.
    async fn executors_claiming_in_batches_run_every_story_once(t) {
        let run_id = run_of(&t.db, 300).await;
        let counting = Counting::default();
        let mut tasks = Vec::new();
        for p in 0..3 {
            let db = run_domain::connect(&t.url).await.expect("connect");
            let executor = Executor::new(
                db,
                counting.clone(),
                ExecutorConfig::default()
                    .workers(8)
                    .worker_prefix(format!("proc{p}"))
                    .poll_interval(Duration::from_millis(50)),
            );
            tasks.push(tokio::spawn(async move { executor.execute(run_id).await }));
        }
        let mut claims = 0;
        for task in tasks {
            let summary = task.await.expect("join").expect("execute");
            assert_eq!(summary.fenced, 0, "{summary}");
            claims += summary.claims_tried;
        }
        let runs = counting.0.lock().expect("lock").clone();
        assert_eq!(runs.len(), 300);
        assert!(runs.values().all(|n| *n == 1), "a story ran twice");
        for s in stories_of(&t.db, run_id).await {
            assert_eq!((s.status.as_str(), s.attempts), ("completed", 1), "{}", s.key);
        }
        let run = entity::run::Entity::find_by_id(run_id).one(&t.db).await.expect("run").expect("row");
        assert_eq!(run.status, "completed");
        assert!(claims < 300, "claims were batched: {claims} claim statements for 300 stories");
    }
}
