//! The `run-engine` command line: plans, the example plan end to end, status, logs, cancel,
//! signals, and never printing a password.

mod common;

use common::{ExecProcess, cli, count_status, create, stories, wait_for};
use entity::{run, run_epic};
use run_engine_tests::{RunFactory, each_backend};
use sea_orm::EntityTrait;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn example_plan() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/plan.toml")
}

#[test]
fn a_plan_with_errors_is_refused_naming_the_file_line_and_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = dir.path().join("broken.toml");
    std::fs::write(
        &plan,
        "name = \"broken\"\n\n[[epics]]\nkey = \"build\"\n\n[[epics.stories]]\nkey = \"compile\"\n\n\
         [[epics]]\nkey = \"build\"\n[[epics.stories]]\nkey = \"x\"\ncommand = \"true\"\n",
    )
    .expect("write");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("db.sqlite").display()
    );
    let (status, stdout, stderr) = cli(&url, &["create", plan.to_str().expect("utf-8")]);
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stdout.is_empty());
    let file = plan.display().to_string();
    assert!(
        stderr.contains(&format!(
            "{file}:7:7: epics[0].stories[0].command: story \"compile\" in epic \"build\" has no command"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "{file}:10:7: epics[1].key: duplicate epic key \"build\" (first used on line 4)"
        )),
        "{stderr}"
    );

    std::fs::write(&plan, "name = \"x\"\n[[epics]]\nkey = 3\n").expect("write");
    let (status, _, stderr) = cli(&url, &["create", plan.to_str().expect("utf-8")]);
    assert_eq!(status.code(), Some(1));
    assert!(stderr.contains(&format!("{file}:3:7: ")), "{stderr}");
    assert!(stderr.contains("key"), "{stderr}");

    let (status, _, stderr) = cli(&url, &["create", "/nonexistent/plan.toml"]);
    assert_eq!(status.code(), Some(1));
    assert!(
        stderr.contains("cannot read plan /nonexistent/plan.toml"),
        "{stderr}"
    );
}

#[test]
fn a_database_password_is_never_printed() {
    // A user that does not exist on the test servers: refused at once, with the URL in the
    // message. Plus URLs refused before any connection.
    let mut urls = vec![
        "postgrex://runner:s3cr3t-pw@127.0.0.1:5432/runs".to_owned(),
        "postgres://runner:s3cr3t-pw@[127.0.0.1/runs".to_owned(),
    ];
    for var in ["RUN_ENGINE_TEST_POSTGRES_URL", "RUN_ENGINE_TEST_MYSQL_URL"] {
        if let Ok(server) = std::env::var(var)
            && let Ok(mut url) = url::Url::parse(&server)
            && url.set_username("runner_does_not_exist").is_ok()
            && url.set_password(Some("s3cr3t-pw")).is_ok()
        {
            urls.push(url.to_string());
        }
    }
    for url in &urls {
        let (status, stdout, stderr) =
            cli(url, &["status", "00000000-0000-0000-0000-000000000000"]);
        assert_eq!(status.code(), Some(1), "{url}: {stderr}");
        assert!(
            !stderr.contains("s3cr3t") && !stdout.contains("s3cr3t"),
            "{stderr}"
        );
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
    let (_, _, stderr) = cli(
        &urls[0],
        &["status", "00000000-0000-0000-0000-000000000000"],
    );
    assert!(stderr.contains("runner:***@127.0.0.1:5432"), "{stderr}");
}

#[test]
fn a_short_password_garbles_no_error_message() {
    // Each refused the same way whatever the password: stderr must be exactly what a password
    // sharing no letters with the message gets, so no text is garbled and no position told.
    for shape in [
        "postgres://postgres:{}@127.0.0.1:9/runs",
        "postgres://postgres:{}@[db/runs",
        "mysql://root:{}@db:notaport/test",
    ] {
        let args = ["status", "00000000-0000-0000-0000-000000000000"];
        let (_, _, reference) = cli(&shape.replace("{}", "zq9xw"), &args);
        assert!(reference.starts_with("error: "), "{reference}");
        assert!(!reference.contains("zq9xw"), "{reference}");
        for password in ["o", "ab", "postgres", "error", "127", "p%40ss%3Aw%2Frd"] {
            let url = shape.replace("{}", password);
            let (status, stdout, stderr) = cli(&url, &args);
            assert_eq!(status.code(), Some(1), "{url}: {stderr}");
            assert_eq!(stderr, reference, "password {password:?}");
            assert!(stdout.is_empty(), "{stdout}");
        }
    }
}

each_backend! {
    /// The shipped example plan runs to completion; status and logs show it.
    async fn the_example_plan_runs_to_completion_and_status_and_logs_show_it(t) {
        let started = Instant::now();
        let (status, stdout, stderr) =
            cli(&t.url, &["run", example_plan().to_str().expect("utf-8"), "--workers", "4"]);
        assert!(status.success(), "run failed: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(stdout.contains("completed: 12 completed, 0 failed, 0 cancelled of 12"), "{stdout}");
        let run_id: uuid::Uuid = stderr
            .lines()
            .find_map(|l| l.strip_prefix("created run "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .expect("the run id on stderr");
        assert!(stderr.contains("completed build/compile"), "{stderr}");

        let (status, tree, _) = cli(&t.url, &["status", &run_id.to_string()]);
        assert!(status.success());
        assert!(tree.contains("completed, 12/12 finished (100%)"), "{tree}");
        assert!(tree.contains("├─ build \"Build\": completed, 4/4"), "{tree}");
        assert!(tree.contains("compile: completed (attempt 1/2"), "{tree}");

        let (status, json, _) = cli(&t.url, &["status", &run_id.to_string(), "--json"]);
        assert!(status.success());
        let json: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(json["run"]["status"], "completed");
        assert_eq!(json["run"]["counts"]["completed"], 12);
        assert_eq!(json["epics"].as_array().map(Vec::len), Some(3));

        let (status, logs, _) = cli(&t.url, &["logs", &run_id.to_string()]);
        assert!(status.success());
        for line in ["[build/compile] compiled", "[test/lint] stderr: lint: 0 warnings", "run example completed"] {
            assert!(logs.contains(line), "{line} missing from:\n{logs}");
        }
        assert!(logs.lines().all(|l| l.starts_with("[20")), "[ts] message lines");
        // In order: nothing of test starts before build completed, nothing of package before
        // test completed; within an epic, a story after the one it needs.
        let at = |needle: &str| {
            logs.lines()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing from:\n{logs}"))
        };
        let first_start = |epic: &str| {
            logs.lines()
                .position(|l| l.contains(&format!("[{epic}/")) && l.contains("] started: attempt"))
                .unwrap_or_else(|| panic!("no story of {epic} started:\n{logs}"))
        };
        assert!(at("epic build completed") < first_start("test"), "{logs}");
        assert!(at("epic test completed") < first_start("package"), "{logs}");
        assert!(at("[build/fetch] completed in") < at("[build/compile] started"), "{logs}");
        assert!(at("[package/checksum] completed in") < at("[package/sign] started"), "{logs}");
        assert_eq!(json["epics"][1]["needs"], serde_json::json!(["build"]));
        assert_eq!(
            json["epics"][2]["stories"][3]["needs"],
            serde_json::json!(["build.docs", "package.checksum"])
        );

        let (status, followed, _) = cli(&t.url, &["logs", &run_id.to_string(), "--follow"]);
        assert!(status.success());
        assert_eq!(followed, logs, "following a finished run prints it once and stops");
    }
}

each_backend! {
    /// `logs --follow` started before the run prints every line as it comes and stops once
    /// the run has finished.
    async fn logs_follow_prints_a_running_run_to_its_end(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(1).stories(6)
            .command("echo \"out $RUN_ENGINE_STORY\"; sleep 0.2")
            .write_plan(dir.path());
        let run_id = create(&t.url, &plan);
        let follower = std::process::Command::new(common::bin())
            .args(["--database-url", &t.url, "logs", "--follow", &run_id.to_string()])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start follower");
        let mut exec = ExecProcess::start(&t.url, run_id, 2, 30, dir.path());
        assert!(exec.wait(Duration::from_secs(60)).await.success(), "{}", exec.stderr_text());
        let out = follower.wait_with_output().expect("follower ends");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        for s in 0..6 {
            assert!(text.contains(&format!("out e0s00{s}")), "{text}");
        }
        assert!(text.trim_end().ends_with("run test completed"), "{text}");
    }
}

each_backend! {
    /// Cancelling a run stops its running stories (their commands are killed), cancels the
    /// pending ones, and the executing process ends non-zero.
    async fn cancel_stops_running_stories_and_cancels_pending_ones(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(2).stories(3).command("sleep 30").write_plan(dir.path());
        let run_id = create(&t.url, &plan);
        let mut exec = ExecProcess::start(&t.url, run_id, 2, 30, dir.path());
        wait_for("two stories running", Duration::from_secs(30), || async {
            count_status(&t.db, run_id, "running").await == 2
        })
        .await;
        let started = Instant::now();
        let (status, stdout, stderr) = cli(&t.url, &["cancel", &run_id.to_string()]);
        assert!(status.success(), "{stderr}");
        // The two running stories are left to their workers, which watch the run and may
        // already have stopped them by the time the command counts what still runs.
        assert!(
            ["2", "1", "0"].iter().any(|n| stdout
                .contains(&format!("cancelled: 4 stories cancelled now, {n} still running"))),
            "{stdout}"
        );

        let status = exec.wait(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(1), "{}", exec.stderr_text());
        assert!(started.elapsed() < Duration::from_secs(15), "the sleeps were killed");
        for s in stories(&t.db, run_id).await {
            assert_eq!(s.status, "cancelled", "{}", s.key);
        }
        for e in run_epic::Entity::find().all(&t.db).await.expect("epics") {
            assert_eq!(e.status, "cancelled", "{}", e.key);
        }
        let run = run::Entity::find_by_id(run_id).one(&t.db).await.expect("read").expect("run");
        assert_eq!(run.status, "cancelled");

        let (status, _, stderr) = cli(&t.url, &["cancel", &run_id.to_string()]);
        assert!(status.success(), "cancelling again is harmless: {stderr}");
    }
}

each_backend! {
    /// Ctrl-C (SIGINT) lets running stories finish and starts no new ones; SIGTERM stops
    /// running stories and gives their leases back without counting the attempt. Either way
    /// the process ends non-zero (130).
    async fn ctrl_c_drains_and_sigterm_gives_leases_back(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(1).stories(6).command("sleep 1").write_plan(dir.path());
        let run_id = create(&t.url, &plan);
        let mut exec = ExecProcess::start(&t.url, run_id, 2, 30, dir.path());
        wait_for("two stories running", Duration::from_secs(30), || async {
            count_status(&t.db, run_id, "running").await == 2
        })
        .await;
        exec.signal("INT");
        let status = exec.wait(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(130), "{}", exec.stderr_text());
        let all = stories(&t.db, run_id).await;
        let completed = all.iter().filter(|s| s.status == "completed").count();
        let pending = all.iter().filter(|s| s.status == "pending").count();
        assert_eq!((completed, pending), (2, 4), "the two running stories finished, nothing new started");

        let dir2 = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(1).stories(4)
            .command("sleep 30")
            .write_plan(dir2.path());
        let run_id = create(&t.url, &plan);
        let mut exec = ExecProcess::start(&t.url, run_id, 2, 30, dir2.path());
        wait_for("two stories running", Duration::from_secs(30), || async {
            count_status(&t.db, run_id, "running").await == 2
        })
        .await;
        let started = Instant::now();
        exec.signal("TERM");
        let status = exec.wait(Duration::from_secs(20)).await;
        assert_eq!(status.code(), Some(130), "{}", exec.stderr_text());
        assert!(started.elapsed() < Duration::from_secs(15), "the sleeps were stopped");
        for s in stories(&t.db, run_id).await {
            assert_eq!(s.status, "pending", "{}", s.key);
            assert_eq!(s.attempts, 0, "{}: a given-back attempt is not counted", s.key);
            assert_eq!(s.lease_owner, None);
        }
        // The given-back stories run again later, in full.
        let mut again = ExecProcess::start(&t.url, run_id, 4, 30, dir2.path());
        wait_for("four stories running again", Duration::from_secs(30), || async {
            count_status(&t.db, run_id, "running").await == 4
        })
        .await;
        again.signal("TERM");
        assert_eq!(again.wait(Duration::from_secs(20)).await.code(), Some(130));
    }
}

/// `run-engine logs --follow <run>` in the background, its output going to a file.
struct Follower {
    child: std::process::Child,
    out: PathBuf,
}

impl Follower {
    fn start(url: &str, run_id: uuid::Uuid, dir: &std::path::Path) -> Follower {
        let out = dir.join(format!("follow-{}.out", fastrand::u32(..)));
        let child = std::process::Command::new(common::bin())
            .args([
                "--database-url",
                url,
                "logs",
                "--follow",
                &run_id.to_string(),
            ])
            .env_remove("DATABASE_URL")
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).expect("follower output"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start logs --follow");
        Follower { child, out }
    }

    /// Waits for the follower to end by itself; returns what it printed.
    async fn finish(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                assert!(status.success(), "logs --follow failed: {status}");
                return std::fs::read_to_string(&self.out).expect("follower output");
            }
            assert!(
                Instant::now() < deadline,
                "logs --follow still running after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The whole log as `run-engine logs` prints it.
fn whole_log(url: &str, run_id: uuid::Uuid) -> String {
    let (status, stdout, stderr) = cli(url, &["logs", &run_id.to_string()]);
    assert!(status.success(), "{stderr}");
    stdout
}

each_backend! {
    /// A follower ends only after the run's closing line, and that line is the last of the log:
    /// for a run cancelled while six stories run (their workers write after the cancellation),
    /// for a pending run cancelled before any claim, and for a run that completed.
    async fn a_follower_ends_after_the_closing_line_which_is_the_last_line_on_every_path(t) {
        let dir = tempfile::tempdir().expect("temp dir");

        // Cancelled while running.
        let plan = RunFactory::new().epics(2).stories(6).command("sleep 25").write_plan(dir.path());
        let run_id = create(&t.url, &plan);
        let follower = Follower::start(&t.url, run_id, dir.path());
        let mut exec = ExecProcess::start(&t.url, run_id, 6, 30, dir.path());
        wait_for("six stories running", Duration::from_secs(30), || async {
            count_status(&t.db, run_id, "running").await == 6
        })
        .await;
        let (status, _, stderr) = cli(&t.url, &["cancel", &run_id.to_string()]);
        assert!(status.success(), "{stderr}");
        let followed = follower.finish(Duration::from_secs(30)).await;
        exec.wait(Duration::from_secs(30)).await;
        let log = whole_log(&t.url, run_id);
        assert_eq!(followed, log, "the follower saw the whole log");
        assert!(log.lines().last().is_some_and(|l| l.ends_with("] run test cancelled")), "{log}");
        assert_eq!(log.matches("cancelled on ").count(), 6, "{log}");
        assert_eq!(log.matches("] run test ").count(), 1, "{log}");

        // Cancelled before any claim: the cancellation writes the closing line itself.
        let run_id = create(&t.url, &plan);
        let (status, _, stderr) = cli(&t.url, &["cancel", &run_id.to_string()]);
        assert!(status.success(), "{stderr}");
        let log = whole_log(&t.url, run_id);
        let last = log.lines().last().unwrap_or_default().to_owned();
        assert!(last.ends_with("] run test cancelled"), "{log}");
        assert_eq!(log.lines().count(), 3, "two epic lines and the run's: {log}");
        let followed = Follower::start(&t.url, run_id, dir.path()).finish(Duration::from_secs(10)).await;
        assert_eq!(followed, log);

        // Completed.
        let plan = RunFactory::new().epics(2).stories(3)
            .command("echo hello")
            .write_plan(dir.path());
        let run_id = create(&t.url, &plan);
        let follower = Follower::start(&t.url, run_id, dir.path());
        let (status, _, stderr) = cli(&t.url, &["exec", &run_id.to_string(), "--workers", "4"]);
        assert!(status.success(), "{stderr}");
        let followed = follower.finish(Duration::from_secs(30)).await;
        let log = whole_log(&t.url, run_id);
        assert_eq!(followed, log);
        assert!(log.lines().last().is_some_and(|l| l.ends_with("] run test completed")), "{log}");
        assert_eq!(log.matches("hello").count(), 6, "{log}");
    }
}

each_backend! {
    /// When the run log cannot take a story's lines, the story is not recorded completed and
    /// `exec` fails loudly; once the log works again the story runs and its lines are there.
    async fn lines_that_cannot_be_written_fail_the_execution_instead_of_completing_it(t) {
        use sea_orm::ConnectionTrait;
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(1).stories(2)
            .command("echo hello")
            .write_plan(dir.path());
        let run_id = create(&t.url, &plan);
        t.db.execute_unprepared("ALTER TABLE run_log RENAME TO run_log_away").await.expect("hide the log");
        let (status, _, stderr) = cli(&t.url, &["exec", &run_id.to_string(), "--workers", "2"]);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("the run log lost lines"), "{stderr}");
        for s in stories(&t.db, run_id).await {
            assert_ne!(s.status, "completed", "{} completed without its lines", s.key);
        }
        t.db.execute_unprepared("ALTER TABLE run_log_away RENAME TO run_log").await.expect("restore the log");
        let (status, _, stderr) = cli(&t.url, &["exec", &run_id.to_string(), "--workers", "2"]);
        assert!(status.success(), "{stderr}");
        let log = whole_log(&t.url, run_id);
        assert_eq!(log.matches("] hello").count(), 2, "{log}");
        assert!(log.lines().last().is_some_and(|l| l.ends_with("] run test completed")), "{log}");
    }
}

each_backend! {
    /// `graph` draws a plan file or a run, `status` tells what each pending story waits on
    /// (and `--json` carries it), and a plan with a cycle is refused naming the cycle.
    async fn graph_status_and_a_cycle_as_a_user_sees_them(t) {
        let plan = example_plan();
        let plan = plan.to_str().expect("utf-8");
        let (status, dot, stderr) = cli(&t.url, &["graph", plan]);
        assert!(status.success(), "{stderr}");
        assert!(dot.starts_with("digraph"), "{dot}");
        assert!(dot.contains("s0_0 -> s0_1"), "fetch -> compile: {dot}");
        let (status, mermaid, _) = cli(&t.url, &["graph", plan, "--format", "mermaid"]);
        assert!(status.success());
        assert!(mermaid.contains("flowchart LR"), "{mermaid}");
        assert!(mermaid.contains("e0 --> e1") && mermaid.contains("e1 --> e2"), "{mermaid}");
        let (status, _, stderr) = cli(&t.url, &["graph", plan, "--format", "png"]);
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("png"), "{stderr}");

        let run_id = create(&t.url, std::path::Path::new(plan)).to_string();
        let (status, tree, _) = cli(&t.url, &["status", &run_id]);
        assert!(status.success());
        assert!(tree.contains("├─ test \"Test\": pending, 0/4 (4 pending), needs build"), "{tree}");
        assert!(tree.contains("unit: pending (attempt 0/1, waiting on build)"), "{tree}");
        assert!(tree.contains("compile: pending (attempt 0/2, waiting on build.fetch)"), "{tree}");
        let (_, json, _) = cli(&t.url, &["status", &run_id, "--json"]);
        let json: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(
            json["epics"][2]["stories"][3]["waiting_on"],
            serde_json::json!(["build.docs", "package.checksum", "test"])
        );
        let (status, graph, _) = cli(&t.url, &["graph", &run_id]);
        assert!(status.success());
        assert!(graph.contains("(pending)"), "a run's graph shows statuses: {graph}");

        let dir = tempfile::tempdir().expect("temp dir");
        let cyclic = dir.path().join("cycle.toml");
        std::fs::write(
            &cyclic,
            "name = \"c\"\n[[epics]]\nkey = \"test\"\n[[epics.stories]]\nkey = \"unit\"\n\
             command = \"true\"\nneeds = [\"lint\"]\n[[epics.stories]]\nkey = \"lint\"\n\
             command = \"true\"\nneeds = [\"unit\"]\n",
        )
        .expect("write");
        let (status, stdout, stderr) = cli(&t.url, &["create", cyclic.to_str().expect("utf-8")]);
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(stdout.is_empty());
        assert!(
            stderr.contains("cycle.toml:7:10: epics[0].stories[0].needs[0]: ")
                && stderr.contains("test.unit -> test.lint -> test.unit"),
            "{stderr}"
        );
    }
}

/// `run-engine` with `RUST_LOG` (none when empty); returns (status, stdout, stderr).
fn cli_logging(
    url: &str,
    rust_log: &str,
    args: &[&str],
) -> (std::process::ExitStatus, String, String) {
    let mut command = std::process::Command::new(common::bin());
    command
        .arg("--database-url")
        .arg(url)
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG");
    if !rust_log.is_empty() {
        command.env("RUST_LOG", rust_log);
    }
    let out = command.output().expect("run run-engine");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn rust_log_shows_each_claim_and_record_as_text_or_json() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("db.sqlite").display()
    );
    let plan = example_plan();
    let plan = plan.to_str().expect("utf-8");
    let (status, _, stderr) = cli_logging(&url, "run_engine=debug", &["run", plan, "-w", "4"]);
    assert!(status.success(), "{stderr}");
    let claimed = stderr
        .lines()
        .filter(|l| l.contains("DEBUG") && l.contains("claimed") && l.contains("story=compile"))
        .count();
    assert_eq!(claimed, 1, "one claim of build/compile:\n{stderr}");
    assert!(
        stderr.lines().any(
            |l| l.contains("recorded") && l.contains("status=\"completed\"")
                || l.contains("recorded") && l.contains("status=completed")
        ),
        "{stderr}"
    );
    // Spans: a record happens inside its attempt's span, named with its story.
    assert!(stderr.contains("attempt{"), "{stderr}");

    let (status, _, stderr) = cli_logging(
        &url,
        "run_engine=debug",
        &["--log-format", "json", "run", plan, "-w", "4"],
    );
    assert!(status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        events
            .iter()
            .any(|e| e["fields"]["message"] == "claimed" && e["fields"]["story"] == "compile"),
        "{stderr}"
    );

    // The default shows warnings only: no claim is printed.
    let (status, _, stderr) = cli_logging(&url, "", &["run", plan, "-w", "4"]);
    assert!(status.success(), "{stderr}");
    assert!(!stderr.contains("claimed"), "{stderr}");
}

each_backend! {
    /// `--claim-batch`: a plan of 40 quick stories runs to completion claimed in batches (the
    /// default) and one by one (`--claim-batch 1`), every story once with one attempt; out of
    /// range is refused by name before anything is created.
    async fn claim_batch_runs_a_plan_in_batches_or_one_by_one(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let plan = RunFactory::new().epics(2).stories(20).command("true").write_plan(dir.path());
        for extra in [&[][..], &["--claim-batch", "1"][..]] {
            let mut args = vec!["run", plan.to_str().expect("utf-8"), "--workers", "4"];
            args.extend_from_slice(extra);
            let (status, stdout, stderr) = cli(&t.url, &args);
            assert!(status.success(), "{extra:?}: {stderr}");
            assert!(stdout.contains("completed: 40 completed, 0 failed, 0 cancelled of 40"), "{extra:?}: {stdout}");
        }
        let stories = entity::run_story::Entity::find().all(&t.db).await.expect("stories");
        assert_eq!(stories.len(), 80);
        assert!(stories.iter().all(|s| s.status == "completed" && s.attempts == 1));
        let (status, _, stderr) = cli(&t.url, &["run", plan.to_str().expect("utf-8"), "--claim-batch", "0"]);
        assert!(!status.success());
        assert!(stderr.contains("--claim-batch"), "{stderr}");
        assert_eq!(entity::run::Entity::find().all(&t.db).await.expect("runs").len(), 2, "nothing created");
    }
}

/// Read-only commands against a SQLite file that does not exist say so, with its path, and
/// create nothing; a `.env` that cannot be read or parsed is an error, not a fall-back to the
/// default database.
#[test]
fn read_only_commands_do_not_create_a_database_and_an_unreadable_env_is_an_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("nowhere").join("runs.db");
    let url = format!("sqlite://{}?mode=rwc", missing.display());
    let id = uuid::Uuid::new_v4().to_string();
    for args in [
        vec!["status", id.as_str()],
        vec!["logs", id.as_str()],
        vec!["limits"],
        vec!["graph", id.as_str()],
    ] {
        let (status, _, stderr) = cli(&url, &args);
        assert!(!status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains("no database at") && stderr.contains("runs.db"),
            "{args:?}: {stderr}"
        );
    }
    assert!(
        !missing.exists() && !missing.parent().is_some_and(|p| p.exists()),
        "nothing was created"
    );

    // A database that is there but not run-engine's: refused, and left without tables.
    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").expect("empty file");
    let url = format!("sqlite://{}?mode=rwc", empty.display());
    let (status, _, stderr) = cli(&url, &["status", id.as_str()]);
    assert!(!status.success());
    assert!(stderr.contains("holds no run-engine tables"), "{stderr}");
    for file in [empty.clone(), dir.path().join("empty.db-wal")] {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(12).any(|w| w == b"CREATE TABLE"),
            "no tables created in {}",
            file.display()
        );
    }

    // A `.env` that cannot be parsed: refused (naming no content: it may hold a password), and
    // no default database appears.
    let cwd = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        cwd.path().join(".env"),
        "DATABASE_URL postgres://u:secret@h/db\n",
    )
    .expect(".env");
    let out = std::process::Command::new(common::bin())
        .args(["status", id.as_str()])
        .current_dir(cwd.path())
        .env_remove("DATABASE_URL")
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(".env cannot be used: syntax error"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret"), "{stderr}");
    assert!(
        !cwd.path().join("run-engine.db").exists(),
        "no default database created"
    );
}
