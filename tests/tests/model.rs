//! Property test: random interleavings of updates and transitions by several actors, each
//! holding its own (possibly stale) copy of one story, checked against a simple model.

use entity::run_story;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use run_domain::{
    Changes, ConcurrencyError, Lifecycle, StoryStatus, TransitionError, VersionedUpdate, transition,
};
use run_engine_tests::{Backend, TestDb};
use sea_orm::DatabaseConnection;

const ACTORS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Read(usize),
    Update(usize, i32),
    Transition(usize, StoryStatus),
}

fn op() -> impl Strategy<Value = Op> {
    let actor = 0..ACTORS;
    prop_oneof![
        actor.clone().prop_map(Op::Read),
        (actor.clone(), 0..1000i32).prop_map(|(a, n)| Op::Update(a, n)),
        (actor, proptest::sample::select(StoryStatus::ALL)).prop_map(|(a, s)| Op::Transition(a, s)),
    ]
}

/// The model: what the row should hold.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Row {
    version: i32,
    status: StoryStatus,
    attempts: i32,
}

async fn check(db: &DatabaseConnection, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let start = run_engine_tests::new_story(db).await;
    let id = start.id;
    let mut model = Row {
        version: 1,
        status: StoryStatus::Pending,
        attempts: 0,
    };
    let mut copies: Vec<run_story::Model> = vec![start; ACTORS];
    for op in ops {
        match op {
            Op::Read(a) => {
                copies[a] = run_story::Entity::find_versioned(db, id)
                    .await
                    .expect("read");
            }
            Op::Update(a, n) => {
                let got = run_story::Entity::update_versioned(
                    db,
                    id,
                    copies[a].version,
                    Changes::new().set(run_story::Column::Attempts, n),
                )
                .await;
                if copies[a].version == model.version {
                    let row =
                        got.map_err(|e| TestCaseError::fail(format!("update should win: {e}")))?;
                    model.version += 1;
                    model.attempts = n;
                    prop_assert_eq!(row.version, model.version);
                    copies[a] = row;
                } else {
                    match got {
                        Err(ConcurrencyError::Conflict {
                            expected, actual, ..
                        }) => {
                            prop_assert_eq!(expected, copies[a].version);
                            prop_assert_eq!(actual, model.version);
                        }
                        other => {
                            return Err(TestCaseError::fail(format!("stale update: {other:?}")));
                        }
                    }
                }
            }
            Op::Transition(a, to) => {
                let from = StoryStatus::parse(&copies[a].status).expect("known status");
                let got = transition::<run_story::Entity, _>(db, &copies[a], to).await;
                if !from.can_become(to) {
                    prop_assert!(
                        matches!(got, Err(TransitionError::Illegal { .. })),
                        "illegal {from}->{to}: {got:?}"
                    );
                } else if copies[a].version == model.version {
                    let row = got
                        .map_err(|e| TestCaseError::fail(format!("transition should win: {e}")))?;
                    model.version += 1;
                    model.status = to;
                    prop_assert_eq!(row.status.as_str(), to.as_str());
                    copies[a] = row;
                } else {
                    prop_assert!(
                        got.as_ref().is_err_and(|e| e.is_conflict()),
                        "stale transition: {got:?}"
                    );
                }
            }
        }
        let row = run_story::Entity::find_versioned(db, id)
            .await
            .expect("read");
        prop_assert_eq!(
            Row {
                version: row.version,
                status: StoryStatus::parse(&row.status).expect("status"),
                attempts: row.attempts
            },
            model
        );
    }
    Ok(())
}

fn run_model(backend: Backend) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let Some(t) = rt.block_on(TestDb::migrated(backend)) else {
        return;
    };
    let mut runner = TestRunner::new(Config {
        cases: 40,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        rt.block_on(check(&t.db, ops))
    });
    if let Err(e) = result {
        panic!("{backend:?}: {e}");
    }
}

#[test]
fn interleaved_updates_and_transitions_match_the_model_on_sqlite() {
    run_model(Backend::Sqlite);
}

#[test]
fn interleaved_updates_and_transitions_match_the_model_on_postgres() {
    run_model(Backend::Postgres);
}

#[test]
fn interleaved_updates_and_transitions_match_the_model_on_mysql() {
    run_model(Backend::MySql);
}
