//! Claiming stories in one process, on every backend: the executor hands each story out
//! exactly once, compare-and-swap claims stay exclusive when every worker aims at the same
//! story, and the naive read-then-write claim under the same load does not.

use async_trait::async_trait;
use entity::run_story;
use run_domain::{Lifecycle, StoryStatus};
use run_engine::{
    Executor, ExecutorConfig, Lease, StoryContext, StoryHandler, StoryOutcome, TryClaim,
    pending_candidates, try_claim,
};
use run_engine_tests::{RunFactory, each_backend};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter, QueryOrder,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Barrier;
use uuid::Uuid;

const WORKERS: usize = 8;
const STORIES: usize = 100;

/// A run of `STORIES` no-op stories in four epics.
async fn run_of_noops(db: &DatabaseConnection) -> Uuid {
    RunFactory::new()
        .key("noops")
        .epics(4)
        .stories(STORIES / 4)
        .create(db)
        .await
        .id()
}

/// Counts how often each story is handled.
#[derive(Default)]
struct Counting {
    runs: Mutex<HashMap<Uuid, u32>>,
}

#[async_trait]
impl StoryHandler for Counting {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        if let Ok(mut runs) = self.runs.lock() {
            *runs.entry(ctx.story.id).or_insert(0) += 1;
        }
        tokio::task::yield_now().await;
        StoryOutcome::Completed
    }
}

struct Shared(Arc<Counting>);

#[async_trait]
impl StoryHandler for Shared {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        self.0.run(ctx).await
    }
}

each_backend! {
    /// Eight workers of one executor on 100 stories: every story is handled exactly once and
    /// the run completes.
    async fn eight_workers_in_one_process_handle_every_story_exactly_once(t) {
        let run_id = run_of_noops(&t.db).await;
        let counting = Arc::new(Counting::default());
        let executor = Executor::new(
            t.db.clone(),
            Shared(counting.clone()),
            ExecutorConfig::default().workers(WORKERS).poll_interval(Duration::from_millis(50)),
        );
        let summary = executor.execute(run_id).await.expect("execute");
        assert_eq!(summary.run_status, "completed", "{summary}");
        assert_eq!(summary.counts.completed, STORIES as u64);
        assert_eq!(summary.recorded, STORIES as u64);
        assert_eq!(summary.fenced, 0);

        let runs = counting.runs.lock().expect("lock").clone();
        assert_eq!(runs.len(), STORIES, "every story was handled");
        let twice: Vec<_> = runs.iter().filter(|(_, n)| **n != 1).collect();
        assert!(twice.is_empty(), "stories handled more than once: {twice:?}");
        for story in run_story::Entity::find()
            .filter(run_story::Column::RunId.eq(run_id))
            .all(&t.db)
            .await
            .expect("read")
        {
            assert_eq!((story.status.as_str(), story.attempts), ("completed", 1), "{}", story.key);
            assert!(story.lease_owner.is_some_and(|o| o.starts_with(&ExecutorConfig::default().worker_prefix)));
        }
        for epic in entity::run_epic::Entity::find().all(&t.db).await.expect("epics") {
            assert_eq!(epic.status, "completed");
        }
    }
}

/// Eight workers each claim, over and over, the FIRST pending story (the worst case for
/// contention), all reading it before any writes in the first round; `claim` is the claim
/// under test. Returns how often each story was handed out.
async fn first_pending_race<F, Fut>(
    db: &DatabaseConnection,
    run_id: Uuid,
    claim: F,
) -> HashMap<Uuid, u32>
where
    F: Fn(DatabaseConnection, run_story::Model, String) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let barrier = Arc::new(Barrier::new(WORKERS));
    let handed_out: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
    let claim = Arc::new(claim);
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (db, barrier, handed_out, claim) = (
            db.clone(),
            barrier.clone(),
            handed_out.clone(),
            claim.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let owner = format!("test-worker-{w}");
            let mut round = 0;
            loop {
                let first = pending_candidates(&db, run_id, 1)
                    .await
                    .expect("read")
                    .pop();
                if round == 0 {
                    barrier.wait().await;
                }
                round += 1;
                let Some(story) = first else { break };
                if claim(db.clone(), story.clone(), owner.clone()).await {
                    *handed_out
                        .lock()
                        .expect("lock")
                        .entry(story.id)
                        .or_insert(0) += 1;
                    // The work: complete it, so that the next round moves on.
                    let held = run_story::Entity::find_by_id(story.id)
                        .one(&db)
                        .await
                        .expect("read")
                        .expect("row");
                    if held.status == StoryStatus::Running.as_str() {
                        // Best effort: a duplicate holder may find it completed already.
                        let _ =
                            run_engine::release(&db, &held, run_engine::Release::Completed).await;
                    }
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("worker");
    }
    Arc::try_unwrap(handed_out)
        .map(|m| m.into_inner().expect("lock"))
        .unwrap_or_default()
}

each_backend! {
    /// The compare-and-swap claim under that load: every story is handed out exactly once,
    /// though all eight workers read the same story in the first round.
    async fn compare_and_swap_claims_hand_each_story_out_once_when_all_workers_aim_at_one(t) {
        let run_id = run_of_noops(&t.db).await;
        let handed_out = first_pending_race(&t.db, run_id, |db, story, owner| async move {
            let lease = Lease::new(owner, Duration::from_secs(30));
            matches!(
                try_claim(&db, &story, &lease, chrono::Utc::now()).await.expect("claim"),
                TryClaim::Claimed(_)
            )
        })
        .await;
        assert_eq!(handed_out.len(), STORIES, "every story was handed out");
        let twice: Vec<_> = handed_out.values().filter(|n| **n > 1).collect();
        assert!(twice.is_empty(), "compare-and-swap handed stories out twice: {twice:?}");
    }
}

each_backend! {
    /// The unsafe variant: read a pending story, then write it running without a version
    /// check. Under the same load, the first story is handed out to every worker that read it.
    async fn a_naive_claim_without_a_version_check_hands_a_story_out_twice(t) {
        let run_id = run_of_noops(&t.db).await;
        let handed_out = first_pending_race(&t.db, run_id, |db, story, owner| async move {
            // The bug under test: whatever happened since the read, write "running".
            run_story::Entity::update(run_story::ActiveModel {
                id: Set(story.id),
                status: Set(StoryStatus::Running.as_str().to_owned()),
                lease_owner: Set(Some(owner)),
                attempts: Set(story.attempts + 1),
                ..Default::default()
            })
            .exec(&db)
            .await
            .is_ok()
        })
        .await;
        let most = handed_out.values().copied().max().unwrap_or(0);
        assert!(
            most > 1,
            "the naive claim should hand some story out more than once; max was {most}"
        );
        let first = run_story::Entity::find()
            .filter(run_story::Column::RunId.eq(run_id))
            .order_by_asc(run_story::Column::Position)
            .order_by_asc(run_story::Column::Id)
            .one(&t.db)
            .await
            .expect("read")
            .expect("row");
        assert_eq!(
            handed_out.get(&first.id).copied(),
            Some(WORKERS as u32),
            "all {WORKERS} workers read the first story before anyone wrote, and all got it"
        );
    }
}
