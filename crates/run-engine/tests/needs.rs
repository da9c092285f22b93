//! Ordered plans on every backend: random acyclic plans executed by two executors with separate
//! pools, whose run log (gap-free, in commit order) shows every need ending before its dependent
//! starts; the same plans without their needs stored, to show the check bites; the claim path a
//! sibling executor uses refusing a waiting story; and a process killed with SIGKILL in the
//! middle of a chain.

mod common;

use async_trait::async_trait;
use common::{ExecProcess, count_status, create, log_text, wait_for};
use entity::run_story;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use run_domain::{StoryStatus, TransitionError, transition_with};
use run_engine::{
    Executor, ExecutorConfig, Lease, Plan, StoryContext, StoryHandler, StoryOutcome, TryClaim,
    create_run_from_plan, try_claim,
};
use run_engine_tests::{Backend, TestDb, each_backend};
use sea_orm::{ColumnTrait, DatabaseConnection, EntityTrait, QueryFilter};
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use uuid::Uuid;

/// What a generated story does: completes, fails every attempt, or fails its first only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ok,
    Fail,
    Flaky,
}

#[derive(Debug, Clone)]
struct GenStory {
    /// Earlier stories it needs, as (epic, story).
    needs: Vec<(usize, usize)>,
    kind: Kind,
    millis: u64,
}

#[derive(Debug, Clone)]
struct GenEpic {
    /// Earlier epics it needs.
    needs: Vec<usize>,
    stories: Vec<GenStory>,
}

/// A random acyclic plan: every need points at an earlier story or epic (in file order).
#[derive(Debug, Clone)]
struct GenPlan {
    epics: Vec<GenEpic>,
}

fn name(e: usize, s: usize) -> String {
    format!("e{e}.s{s}")
}

fn plan_strategy() -> impl Strategy<Value = GenPlan> {
    proptest::collection::vec(1usize..=15, 1..=4)
        .prop_flat_map(|sizes| {
            let total: usize = sizes.iter().sum();
            let epics = sizes.len();
            (
                Just(sizes),
                proptest::collection::vec(proptest::collection::vec(any::<Index>(), 0..=2), total),
                proptest::collection::vec(proptest::collection::vec(any::<Index>(), 0..=1), epics),
                proptest::collection::vec((0u8..20, 0u64..25), total),
            )
        })
        .prop_map(|(sizes, story_needs, epic_needs, behaviour)| {
            let mut all = Vec::new();
            let mut epics = Vec::new();
            for (e, size) in sizes.iter().enumerate() {
                let mut stories = Vec::new();
                for s in 0..*size {
                    let g = all.len();
                    let mut needs: Vec<(usize, usize)> = story_needs[g]
                        .iter()
                        .filter(|_| g > 0)
                        .map(|i| all[i.index(g)])
                        .collect();
                    needs.sort_unstable();
                    needs.dedup();
                    let (roll, millis) = behaviour[g];
                    let kind = match roll {
                        0 => Kind::Fail,
                        1 => Kind::Flaky,
                        _ => Kind::Ok,
                    };
                    stories.push(GenStory {
                        needs,
                        kind,
                        millis,
                    });
                    all.push((e, s));
                }
                let mut needs: Vec<usize> = epic_needs[e]
                    .iter()
                    .filter(|_| e > 0)
                    .map(|i| i.index(e))
                    .collect();
                needs.sort_unstable();
                needs.dedup();
                epics.push(GenEpic { needs, stories });
            }
            GenPlan { epics }
        })
}

impl GenPlan {
    /// The plan file, with its needs or without them.
    fn toml(&self, with_needs: bool) -> String {
        let mut out = String::from("name = \"prop\"\n");
        for (e, epic) in self.epics.iter().enumerate() {
            let _ = writeln!(out, "[[epics]]\nkey = \"e{e}\"");
            if with_needs && !epic.needs.is_empty() {
                let needs: Vec<String> = epic.needs.iter().map(|n| format!("\"e{n}\"")).collect();
                let _ = writeln!(out, "needs = [{}]", needs.join(", "));
            }
            for (s, story) in epic.stories.iter().enumerate() {
                let (command, attempts) = match story.kind {
                    Kind::Ok => (format!("ok {}", story.millis), 1),
                    Kind::Fail => (format!("fail {}", story.millis), 1),
                    Kind::Flaky => (format!("flaky {}", story.millis), 2),
                };
                let _ = writeln!(
                    out,
                    "[[epics.stories]]\nkey = \"s{s}\"\ncommand = \"{command}\"\nmax_attempts = {attempts}"
                );
                if with_needs && !story.needs.is_empty() {
                    // Both spellings: bare within the epic, qualified across epics.
                    let needs: Vec<String> = story
                        .needs
                        .iter()
                        .map(|&(ne, ns)| {
                            if ne == e {
                                format!("\"s{ns}\"")
                            } else {
                                format!("\"{}\"", name(ne, ns))
                            }
                        })
                        .collect();
                    let _ = writeln!(out, "needs = [{}]", needs.join(", "));
                }
            }
        }
        out
    }

    /// Every need as (needed story, waiting story), epic-level needs expanded.
    fn edges(&self) -> Vec<(String, String)> {
        let mut edges = Vec::new();
        for (e, epic) in self.epics.iter().enumerate() {
            for (s, story) in epic.stories.iter().enumerate() {
                for &(ne, ns) in &story.needs {
                    edges.push((name(ne, ns), name(e, s)));
                }
                for &ne in &epic.needs {
                    for ns in 0..self.epics[ne].stories.len() {
                        edges.push((name(ne, ns), name(e, s)));
                    }
                }
            }
        }
        edges
    }

    /// Each story's expected end: skipped when something it needs (transitively) did not
    /// complete, else failed or completed as its kind says.
    fn expected(&self) -> HashMap<String, &'static str> {
        let mut done: HashMap<(usize, usize), bool> = HashMap::new();
        let mut out = HashMap::new();
        for (e, epic) in self.epics.iter().enumerate() {
            let epic_ok = |done: &HashMap<(usize, usize), bool>, ne: usize| {
                (0..self.epics[ne].stories.len()).all(|ns| done.get(&(ne, ns)) == Some(&true))
            };
            let epics_ok = epic.needs.iter().all(|&ne| epic_ok(&done, ne));
            for (s, story) in epic.stories.iter().enumerate() {
                let needs_ok = epics_ok && story.needs.iter().all(|n| done.get(n) == Some(&true));
                let status = match (needs_ok, story.kind) {
                    (false, _) => "skipped",
                    (true, Kind::Fail) => "failed",
                    (true, _) => "completed",
                };
                done.insert((e, s), status == "completed");
                out.insert(name(e, s), status);
            }
        }
        out
    }
}

/// Writes `start <epic.story>` (and waits until it is in the log), sleeps as the command says,
/// writes `end <epic.story>`, and completes or fails as the command says.
struct Traced;

#[async_trait]
impl StoryHandler for Traced {
    async fn run(&self, ctx: StoryContext) -> StoryOutcome {
        let me = format!("{}.{}", ctx.epic_key, ctx.story.key);
        ctx.log.line(format!("start {me}")).await;
        if let Err(e) = ctx.log.flush().await {
            return StoryOutcome::Failed {
                error: e.to_string(),
            };
        }
        let command = ctx.story.command.clone().unwrap_or_default();
        let (kind, millis) = command.split_once(' ').unwrap_or(("ok", "0"));
        tokio::time::sleep(Duration::from_millis(millis.parse().unwrap_or(0))).await;
        ctx.log.line(format!("end {me}")).await;
        match kind {
            "fail" => StoryOutcome::Failed {
                error: "failed".into(),
            },
            "flaky" if ctx.attempt == 1 => StoryOutcome::Failed {
                error: "flaked".into(),
            },
            _ => StoryOutcome::Completed,
        }
    }
}

/// Where each `start X` and `end X` line is in the log (line numbers, in commit order).
struct Trace {
    starts: HashMap<String, Vec<usize>>,
    ends: HashMap<String, Vec<usize>>,
}

impl Trace {
    fn of(log: &str) -> Trace {
        let mut trace = Trace {
            starts: HashMap::new(),
            ends: HashMap::new(),
        };
        for (i, line) in log.lines().enumerate() {
            for (marker, map) in [(" start ", &mut trace.starts), (" end ", &mut trace.ends)] {
                if let Some(pos) = line.rfind(marker) {
                    map.entry(line[pos + marker.len()..].trim().to_owned())
                        .or_default()
                        .push(i);
                }
            }
        }
        trace
    }

    /// The needs (needed, waiting) whose waiting story started before the needed one's last
    /// end (or without any end of it).
    fn violations<'a>(&self, edges: &'a [(String, String)]) -> Vec<&'a (String, String)> {
        edges
            .iter()
            .filter(|(a, b)| {
                let Some(first_start) = self.starts.get(b).and_then(|v| v.first()) else {
                    return false;
                };
                self.ends
                    .get(a)
                    .and_then(|v| v.last())
                    .is_none_or(|end| end > first_start)
            })
            .collect()
    }
}

fn config(prefix: &str) -> ExecutorConfig {
    ExecutorConfig::default()
        .workers(3)
        .poll_interval(Duration::from_millis(20))
        .worker_prefix(prefix)
}

/// Creates the plan (with or without its needs) and runs it with two executors on separate
/// pools; returns the run id.
async fn execute(t: &TestDb, plan: &GenPlan, with_needs: bool) -> Uuid {
    let text = plan.toml(with_needs);
    let parsed = Plan::parse(&text, "prop.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    let run = create_run_from_plan(&t.db, &parsed).await.expect("create");
    let other = t.reconnect().await;
    let a = Executor::new(t.db.clone(), Traced, config("exec-a"));
    let b = Executor::new(other, Traced, config("exec-b"));
    let both = async { tokio::join!(a.execute(run.id), b.execute(run.id)) };
    let Ok((ra, rb)) = tokio::time::timeout(Duration::from_secs(120), both).await else {
        panic!("the run did not finish within 2 minutes:\n{text}");
    };
    ra.expect("executor a");
    rb.expect("executor b");
    run.id
}

async fn statuses(db: &DatabaseConnection, run_id: Uuid) -> HashMap<String, String> {
    let epics: HashMap<Uuid, String> = entity::run_epic::Entity::find()
        .filter(entity::run_epic::Column::RunId.eq(run_id))
        .all(db)
        .await
        .expect("epics")
        .into_iter()
        .map(|e| (e.id, e.key))
        .collect();
    run_story::Entity::find()
        .filter(run_story::Column::RunId.eq(run_id))
        .all(db)
        .await
        .expect("stories")
        .into_iter()
        .map(|s| (format!("{}.{}", epics[&s.epic_id], s.key), s.status))
        .collect()
}

async fn check_case(t: &TestDb, plan: GenPlan) -> Result<bool, TestCaseError> {
    let edges = plan.edges();
    let run_id = execute(t, &plan, true).await;
    let log = log_text(&t.db, run_id).await;
    let trace = Trace::of(&log);
    let bad = trace.violations(&edges);
    prop_assert!(
        bad.is_empty(),
        "started before a need ended: {bad:?}\n{log}"
    );
    let expected = plan.expected();
    let found = statuses(&t.db, run_id).await;
    for (story, want) in &expected {
        prop_assert_eq!(
            found.get(story).map(String::as_str),
            Some(*want),
            "{}\n{}",
            story,
            log
        );
        let starts = trace.starts.get(story).map_or(0, Vec::len);
        let want_starts = match (*want, story_kind(&plan, story)) {
            ("skipped", _) => 0,
            (_, Kind::Flaky) => 2,
            _ => 1,
        };
        prop_assert_eq!(
            starts,
            want_starts,
            "{} started {} times\n{}",
            story,
            starts,
            log
        );
    }
    // The control: the same plan with its needs not stored, under the same load.
    let control = execute(t, &plan, false).await;
    let control_log = log_text(&t.db, control).await;
    Ok(!Trace::of(&control_log).violations(&edges).is_empty())
}

fn story_kind(plan: &GenPlan, story: &str) -> Kind {
    let parse = |s: &str| s.parse::<usize>().unwrap_or(0);
    let (e, s) = story.split_once('.').unwrap_or(("e0", "s0"));
    plan.epics[parse(&e[1..])].stories[parse(&s[1..])].kind
}

fn property(backend: Backend) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime");
    let Some(t) = rt.block_on(TestDb::migrated(backend)) else {
        return;
    };
    let mut runner = TestRunner::new(Config {
        cases: 8,
        failure_persistence: None,
        ..Config::default()
    });
    let control_broke = AtomicUsize::new(0);
    let cases = AtomicUsize::new(0);
    let result = runner.run(&plan_strategy(), |plan| {
        cases.fetch_add(1, Ordering::Relaxed);
        let broke = rt.block_on(check_case(&t, plan))?;
        control_broke.fetch_add(usize::from(broke), Ordering::Relaxed);
        Ok(())
    });
    let (cases, control_broke) = (cases.into_inner(), control_broke.into_inner());
    if let Err(e) = result {
        panic!("{backend:?}: {e}");
    }
    eprintln!(
        "{backend:?}: {cases} plans in order; without their needs stored, {control_broke} ran out of order"
    );
    assert!(
        control_broke > 0,
        "{backend:?}: the control never ran a story before its need ended, so the test cannot tell"
    );
}

#[test]
fn random_acyclic_plans_run_every_need_before_its_dependents_on_sqlite() {
    property(Backend::Sqlite);
}

#[test]
fn random_acyclic_plans_run_every_need_before_its_dependents_on_postgres() {
    property(Backend::Postgres);
}

#[test]
fn random_acyclic_plans_run_every_need_before_its_dependents_on_mysql() {
    property(Backend::MySql);
}

each_backend! {
    /// The claim path a sibling executor uses refuses a story whose need has not completed,
    /// even from a model whose counter was changed to say otherwise; once the need completed,
    /// the same story is claimed.
    async fn a_waiting_story_cannot_be_claimed_by_any_path_until_its_need_completed(t) {
        let plan = Plan::parse(
            "name='p'\n[[epics]]\nkey='a'\n[[epics.stories]]\nkey='first'\ncommand='true'\n\
             [[epics.stories]]\nkey='second'\ncommand='true'\nneeds=['first']\n",
            "p.toml",
        )
        .expect("plan");
        let run = create_run_from_plan(&t.db, &plan).await.expect("create");
        let story = |key: &'static str| {
            let db = &t.db;
            async move {
                run_story::Entity::find()
                    .filter(run_story::Column::RunId.eq(run.id))
                    .filter(run_story::Column::Key.eq(key))
                    .one(db)
                    .await
                    .expect("read")
                    .expect("story")
            }
        };
        let second = story("second").await;
        assert_eq!(second.unmet_needs, 1);
        let candidates = run_engine::pending_candidates(&t.db, run.id, 10).await.expect("candidates");
        assert_eq!(candidates.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["first"]);
        let lease = Lease::new("sibling-0", Duration::from_secs(30));
        let got = try_claim(&t.db, &second, &lease, chrono::Utc::now()).await.expect("try");
        assert_eq!(got, TryClaim::Lost, "a waiting story is not claimed");
        let mut forged = second.clone();
        forged.unmet_needs = 0;
        let err = transition_with::<run_story::Entity, _>(&t.db, &forged, StoryStatus::Running, Default::default())
            .await
            .expect_err("the statement itself checks the counter");
        assert!(matches!(err, TransitionError::NotReady { .. }), "{err:?}");
        assert_eq!(story("second").await.status, "pending", "nothing was written");

        let TryClaim::Claimed(first) = try_claim(&t.db, &story("first").await, &lease, chrono::Utc::now())
            .await
            .expect("claim first")
        else {
            panic!("first is claimable");
        };
        assert_eq!(
            run_domain::satisfy_story(&t.db, first.story.id).await.expect("early"),
            0,
            "letting go before the need completed changes nothing"
        );
        assert_eq!(story("second").await.unmet_needs, 1);
        let (_, gone) =
            run_engine::release_letting_go(&t.db, &first.story, run_engine::Release::Completed)
                .await
                .expect("complete");
        assert_eq!(gone.len(), 1, "its only need completed: let go in the same transaction");
        assert_eq!(gone[0].key, "second");
        assert_eq!(
            run_domain::satisfy_story(&t.db, first.story.id).await.expect("again"),
            0,
            "a second call counts nothing down"
        );
        let second_now = story("second").await;
        assert_eq!(second_now.unmet_needs, 0, "completing the need counted it down");
        assert!(second_now.version > second.version, "the count-down moved the version on");
        assert!(
            matches!(
                try_claim(&t.db, &second, &lease, chrono::Utc::now()).await.expect("stale"),
                TryClaim::Lost
            ),
            "the model read before the count-down is stale"
        );
        let claimed = try_claim(&t.db, &second_now, &lease, chrono::Utc::now()).await.expect("claim");
        assert!(matches!(claimed, TryClaim::Claimed(_)), "{claimed:?}");
    }
}

each_backend! {
    /// A process killed with SIGKILL in the middle of a chain of stories, then another
    /// started: the order still holds and every story completes once.
    async fn a_chain_survives_a_killed_process_in_order(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut text = String::from("name = \"chain\"\n[[epics]]\nkey = \"c\"\n");
        const LINKS: usize = 8;
        for i in 0..LINKS {
            let _ = writeln!(
                text,
                "[[epics.stories]]\nkey = \"l{i}\"\nmax_attempts = 3\ncommand = \"echo start c.l{i}; sleep 0.3; echo end c.l{i}\""
            );
            if i > 0 {
                let _ = writeln!(text, "needs = [\"l{}\"]", i - 1);
            }
        }
        let plan = dir.path().join("chain.toml");
        std::fs::write(&plan, &text).expect("write plan");
        let run_id = create(&t.url, &plan);
        let mut first = ExecProcess::start(&t.url, run_id, 4, 2, dir.path());
        wait_for("three links completed and one running", Duration::from_secs(30), || async {
            count_status(&t.db, run_id, "completed").await >= 3
                && count_status(&t.db, run_id, "running").await >= 1
        })
        .await;
        first.child.kill().expect("SIGKILL");
        let _ = first.child.wait();
        let mut second = ExecProcess::start(&t.url, run_id, 4, 2, dir.path());
        let status = second.wait(Duration::from_secs(60)).await;
        assert!(status.success(), "second exec failed ({status}):\n{}", second.stderr_text());
        let log = log_text(&t.db, run_id).await;
        let trace = Trace::of(&log);
        let edges: Vec<(String, String)> = (1..LINKS)
            .map(|i| (format!("c.l{}", i - 1), format!("c.l{i}")))
            .collect();
        let bad = trace.violations(&edges);
        assert!(bad.is_empty(), "out of order: {bad:?}\n{log}");
        let found = statuses(&t.db, run_id).await;
        let completed: BTreeSet<_> = found.iter().filter(|(_, s)| *s == "completed").map(|(k, _)| k.clone()).collect();
        assert_eq!(completed.len(), LINKS, "every link completed: {found:?}");
        for i in 0..LINKS {
            let done = log.lines().filter(|l| l.contains(&format!("[c/l{i}] completed in "))).count();
            assert!(done <= 1, "l{i} recorded completed {done} times\n{log}");
        }
    }
}

each_backend! {
    /// `fail_fast = true`: the first story that fails for good cancels the rest of the run,
    /// stories that do not depend on it included; without it, those run to the end.
    async fn fail_fast_cancels_the_rest_of_the_run_on_the_first_failure(t) {
        for fail_fast in [true, false] {
            let text = format!(
                "name = \"ff\"\nfail_fast = {fail_fast}\n\
                 [[epics]]\nkey = \"a\"\n[[epics.stories]]\nkey = \"bad\"\ncommand = \"fail 0\"\n\
                 [[epics]]\nkey = \"b\"\n{}\
                 [[epics]]\nkey = \"c\"\nneeds = [\"b\"]\n{}",
                (0..4).map(|i| format!("[[epics.stories]]\nkey = \"s{i}\"\ncommand = \"ok 150\"\n")).collect::<String>(),
                (0..4).map(|i| format!("[[epics.stories]]\nkey = \"s{i}\"\ncommand = \"ok 0\"\n")).collect::<String>(),
            );
            let plan = Plan::parse(&text, "ff.toml").expect("plan");
            let run = create_run_from_plan(&t.db, &plan).await.expect("create");
            let summary = Executor::new(t.db.clone(), Traced, config("ff"))
                .execute(run.id)
                .await
                .expect("execute");
            let found = statuses(&t.db, run.id).await;
            assert_eq!(found["a.bad"], "failed");
            let log = log_text(&t.db, run.id).await;
            if fail_fast {
                assert_eq!(summary.run_status, "cancelled", "{summary}\n{log}");
                for i in 0..4 {
                    assert_eq!(found[&format!("c.s{i}")], "cancelled", "{found:?}\n{log}");
                }
                assert!(log.contains("fail_fast: a/bad failed, so the rest of the run is cancelled"), "{log}");
            } else {
                assert_eq!(summary.run_status, "failed", "{summary}");
                for i in 0..4 {
                    assert_eq!(found[&format!("c.s{i}")], "completed", "{found:?}");
                }
            }
        }
    }
}
