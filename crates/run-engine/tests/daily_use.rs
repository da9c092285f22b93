//! What a user reaches for day to day, driven through the `run-engine` binary: the log on a
//! terminal, the list of runs, retrying a run.

mod common;

use common::{cli, create};
use run_engine_tests::each_backend;
use std::path::Path;
use std::process::Command;

/// Runs `run-engine --database-url <url> <args>` on a pseudo-terminal (util-linux `script`), so
/// its standard output is a terminal; returns what the terminal received.
fn on_a_terminal(url: &str, args: &[&str]) -> String {
    let mut command = format!("{} --database-url '{url}'", common::bin());
    for a in args {
        command.push_str(&format!(" '{a}'"));
    }
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run script (util-linux)");
    assert!(
        out.status.success(),
        "{command} on a terminal failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("runs.db").display())
}

#[test]
fn logs_on_a_terminal_show_control_characters_escaped_and_colour_as_colour() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = sqlite_url(dir.path());
    let plan = dir.path().join("noisy.toml");
    std::fs::write(
        &plan,
        "name = \"noisy\"\n[[epics]]\nkey = \"e\"\n[[epics.stories]]\nkey = \"s\"\n\
         command = \"printf 'bell\\\\a wipe\\\\033[2J back\\\\b \\\\033[31mred\\\\033[0m\\\\n'\"\n",
    )
    .expect("write plan");
    let run_id = create(&url, &plan).to_string();
    let (status, _, stderr) = cli(&url, &["exec", &run_id]);
    assert!(status.success(), "{stderr}");

    // Not a terminal: the bytes as stored.
    let (status, piped, _) = cli(&url, &["logs", &run_id]);
    assert!(status.success());
    assert!(
        piped.contains("bell\u{7} wipe\u{1b}[2J back\u{8} \u{1b}[31mred\u{1b}[0m"),
        "{piped:?}"
    );

    // A terminal: bell, screen wipe and backspace shown, colour kept.
    let shown = on_a_terminal(&url, &["logs", &run_id]);
    assert!(
        shown.contains("bell\\x07 wipe\\x1b[2J back\\x08 \u{1b}[31mred\u{1b}[0m"),
        "{shown:?}"
    );
    assert!(
        !shown.contains('\u{7}') && !shown.contains('\u{8}') && !shown.contains("\u{1b}[2J"),
        "{shown:?}"
    );

    // A terminal with --raw: as stored.
    let raw = on_a_terminal(&url, &["logs", &run_id, "--raw"]);
    assert!(raw.contains("bell\u{7} wipe\u{1b}[2J"), "{raw:?}");
}

/// Writes a one-epic plan named `name` whose stories run `commands`, in `dir`.
fn plan_of(dir: &Path, name: &str, commands: &[&str]) -> std::path::PathBuf {
    let mut text = format!("name = \"{name}\"\n[[epics]]\nkey = \"e\"\n");
    for (i, c) in commands.iter().enumerate() {
        text.push_str(&format!(
            "[[epics.stories]]\nkey = \"s{i}\"\ncommand = \"{c}\"\n"
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("write plan");
    path
}

each_backend! {
    /// `runs` lists recent runs newest first with status and progress; filters by status;
    /// limits; prints JSON; names the statuses when given a wrong one.
    async fn runs_lists_recent_runs_with_status_progress_and_duration(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let done = plan_of(dir.path(), "done", &["true", "true"]);
        let broken = plan_of(dir.path(), "broken", &["true", "exit 3", "true"]);
        let later = plan_of(dir.path(), "later", &["true"]);
        let (status, _, stderr) = cli(&t.url, &["run", done.to_str().expect("utf-8")]);
        assert!(status.success(), "{stderr}");
        let (status, _, _) = cli(&t.url, &["run", broken.to_str().expect("utf-8")]);
        assert!(!status.success(), "the broken plan fails");
        let pending = create(&t.url, &later);

        let (status, table, stderr) = cli(&t.url, &["runs"]);
        assert!(status.success(), "{stderr}");
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "a header and three runs:\n{table}");
        assert!(lines[0].starts_with("ID") && lines[0].contains("PROGRESS"), "{table}");
        assert!(lines[1].starts_with(&pending.to_string()), "newest first:\n{table}");
        assert!(lines[1].contains("pending") && lines[1].contains("0/1 (0%)"), "{table}");
        assert!(lines[2].contains("failed") && lines[2].contains("3/3 (100%)") && lines[2].ends_with("broken"), "{table}");
        assert!(lines[3].contains("completed") && lines[3].contains("2/2 (100%)") && lines[3].ends_with("done"), "{table}");

        let (status, failed, _) = cli(&t.url, &["runs", "--status", "failed"]);
        assert!(status.success());
        assert_eq!(failed.lines().count(), 2, "{failed}");
        assert!(failed.contains("broken"), "{failed}");

        let (status, json, _) = cli(&t.url, &["runs", "--limit", "2", "--json"]);
        assert!(status.success());
        let json: serde_json::Value = serde_json::from_str(&json).expect("json");
        let runs = json.as_array().expect("an array");
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0]["id"], pending.to_string());
        assert_eq!(runs[1]["status"], "failed");
        assert_eq!(runs[1]["counts"]["failed"], 1);
        assert!(runs[1]["duration_ms"].as_i64().is_some_and(|ms| ms >= 0), "{json}");
        assert!(runs[0]["duration_ms"].is_null(), "a run that never started has no duration");

        let (status, _, stderr) = cli(&t.url, &["runs", "--status", "done"]);
        assert!(!status.success());
        assert!(stderr.contains("\"done\" is not a run status: use one of pending, running, completed, failed, cancelled"), "{stderr}");
    }
}

each_backend! {
    /// A failed run is retried: its failed and skipped stories run again, its completed one does
    /// not, and its log closes again; a completed run and a run that executes are refused; a
    /// cancelled run is retried once its stories stopped.
    async fn retry_runs_a_failed_runs_failed_and_skipped_stories_again(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path().display().to_string();
        let plan = dir.path().join("flaky.toml");
        std::fs::write(
            &plan,
            format!(
                "name = \"flaky\"\n[[epics]]\nkey = \"e\"\n\
                 [[epics.stories]]\nkey = \"ok\"\ncommand = \"echo ok >> {d}/ran\"\n\
                 [[epics.stories]]\nkey = \"flaky\"\ncommand = \"echo flaky >> {d}/ran && test -f {d}/fixed\"\n\
                 [[epics.stories]]\nkey = \"after\"\nneeds = [\"flaky\"]\ncommand = \"echo after >> {d}/ran\"\n\
                 [[epics]]\nkey = \"last\"\nneeds = [\"e\"]\n\
                 [[epics.stories]]\nkey = \"end\"\ncommand = \"echo end >> {d}/ran\"\n"
            ),
        )
        .expect("write plan");
        let (status, _, stderr) = cli(&t.url, &["run", plan.to_str().expect("utf-8")]);
        assert!(!status.success(), "the first execution fails: {stderr}");
        let run_id = stderr
            .lines()
            .find_map(|l| l.strip_prefix("created run "))
            .and_then(|l| l.split_whitespace().next())
            .expect("the run id on stderr")
            .to_owned();
        // Which stories ran, in any order (stories without needs run side by side).
        let ran = || {
            let mut lines: Vec<String> = std::fs::read_to_string(dir.path().join("ran"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            lines.sort();
            lines.join(" ")
        };
        assert_eq!(ran(), "flaky ok", "flaky failed, its dependents never started");

        let (status, out, stderr) = cli(&t.url, &["retry", &run_id]);
        assert!(status.success(), "{stderr}");
        assert!(
            out.contains(&format!("run {run_id} retried (was failed): 3 stories back to pending")),
            "{out}"
        );
        let (_, json, _) = cli(&t.url, &["status", &run_id, "--json"]);
        let json: serde_json::Value = serde_json::from_str(&json).expect("json");
        assert_eq!(json["run"]["status"], "pending");
        assert_eq!(json["epics"][0]["stories"][0]["status"], "completed");
        assert_eq!(json["epics"][0]["stories"][1]["status"], "pending");
        assert_eq!(json["epics"][0]["stories"][1]["attempts"], 0);
        assert!(json["epics"][0]["stories"][1]["error"].is_null());
        assert_eq!(json["epics"][0]["stories"][2]["waiting_on"], serde_json::json!(["e.flaky"]));

        std::fs::write(dir.path().join("fixed"), b"").expect("fix it");
        let (status, out, stderr) = cli(&t.url, &["exec", &run_id]);
        assert!(status.success(), "the retried run completes: {out}{stderr}");
        assert_eq!(ran(), "after end flaky flaky ok", "the completed story did not run again");
        let (_, logs, _) = cli(&t.url, &["logs", &run_id]);
        let at = |needle: &str| {
            logs.lines()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} missing from:\n{logs}"))
        };
        assert!(at("run flaky failed") < at("run flaky retried (was failed)"), "{logs}");
        assert!(at("run flaky retried") < at("[e/flaky] completed"), "{logs}");
        assert!(logs.lines().last().is_some_and(|l| l.ends_with("run flaky completed")), "{logs}");
        assert_eq!(logs.matches("epic e failed").count(), 1, "{logs}");
        assert_eq!(logs.matches("epic e completed").count(), 1, "{logs}");
        let (status, followed, _) = cli(&t.url, &["logs", &run_id, "--follow"]);
        assert!(status.success());
        assert_eq!(followed, logs, "a follower ends at the new closing line");

        let (status, _, stderr) = cli(&t.url, &["retry", &run_id]);
        assert!(!status.success());
        assert!(stderr.contains(&format!("run {run_id} is completed: every story completed: nothing to retry")), "{stderr}");

        // While it executes: refused. Cancelled: retried once its story stopped.
        let slow = plan_of(dir.path(), "slow", &["sleep 30"]);
        let slow_id = create(&t.url, &slow);
        let slow_run = slow_id.to_string();
        let mut exec = common::ExecProcess::start(&t.url, slow_id, 1, 30, dir.path());
        let db = t.reconnect().await;
        common::wait_for("the slow story to run", std::time::Duration::from_secs(30), || {
            let db = db.clone();
            async move { common::count_status(&db, slow_id, "running").await == 1 }
        })
        .await;
        let (status, _, stderr) = cli(&t.url, &["retry", &slow_run]);
        assert!(!status.success());
        assert!(stderr.contains("is running: it cannot be retried while it executes"), "{stderr}");
        let (status, _, stderr) = cli(&t.url, &["cancel", &slow_run]);
        assert!(status.success(), "{stderr}");
        exec.wait(std::time::Duration::from_secs(30)).await;
        let (status, out, stderr) = cli(&t.url, &["retry", &slow_run]);
        assert!(status.success(), "{stderr}");
        assert!(out.contains("retried (was cancelled): 1 story back to pending"), "{out}");
    }
}

#[test]
fn a_server_that_does_not_listen_is_named_in_one_line_as_xtask_names_it() {
    // The same sentence `cargo xtask migrate` prints (xtask/tests/migrate_cli.rs).
    let (status, _, stderr) = cli("postgres://app:hunter2@127.0.0.1:9/runs", &["runs"]);
    assert!(!status.success());
    assert_eq!(
        stderr.trim(),
        "error: cannot connect to postgres://app:***@127.0.0.1:9/runs: the server 127.0.0.1:9 \
         cannot be reached: connection refused (is the server running and listening on port 9?)"
    );
}

each_backend! {
    /// A story's `env` (over `[defaults] env`) and `dir` (over `[defaults] dir`, relative to the
    /// executor's working directory) reach its command; a directory that is not there fails the
    /// story saying so; a `payload` is stored as JSON.
    async fn stories_get_their_env_dir_and_payload(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("work/sub")).expect("dirs");
        std::fs::create_dir_all(dir.path().join("work/other")).expect("dirs");
        let plan = dir.path().join("inputs.toml");
        std::fs::write(
            &plan,
            "name = \"inputs\"\n[defaults]\nenv = { A = \"1\", B = \"2\" }\ndir = \"work/sub\"\n\
             [[epics]]\nkey = \"e\"\n\
             [[epics.stories]]\nkey = \"defaults\"\ncommand = 'echo \"got $A$B in $(basename \"$PWD\")\"'\n\
             [[epics.stories]]\nkey = \"own\"\nenv = { B = \"3\", C = \"x y\" }\ndir = \"work/other\"\n\
             command = 'echo \"got $A$B$C in $(basename \"$PWD\")\"'\n\
             payload = { width = 640, tags = [\"a\", \"b\"] }\n\
             [[epics.stories]]\nkey = \"lost\"\ndir = \"work/nowhere\"\ncommand = \"true\"\n",
        )
        .expect("write plan");
        let run_id = create(&t.url, &plan).to_string();
        let out = Command::new(common::bin())
            .args(["--database-url", &t.url, "exec", &run_id])
            .current_dir(dir.path())
            .env_remove("DATABASE_URL")
            .env("A", "from the executor")
            .output()
            .expect("run exec");
        assert!(!out.status.success(), "the story in a missing directory fails the run");
        let (_, logs, _) = cli(&t.url, &["logs", &run_id]);
        assert!(logs.contains("[e/defaults] got 12 in sub"), "{logs}");
        assert!(logs.contains("[e/own] got 13x y in other"), "{logs}");
        let (_, json, _) = cli(&t.url, &["status", &run_id, "--json"]);
        let json: serde_json::Value = serde_json::from_str(&json).expect("json");
        let lost = &json["epics"][0]["stories"][2];
        assert_eq!(lost["status"], "failed");
        assert!(
            lost["error"].as_str().is_some_and(|e| e.contains("work/nowhere does not exist")),
            "{lost}"
        );
        let db = t.reconnect().await;
        let own = common::stories(&db, run_id.parse().expect("uuid"))
            .await
            .into_iter()
            .find(|s| s.key == "own")
            .expect("story own");
        let payload: serde_json::Value =
            serde_json::from_str(own.payload.as_deref().expect("a payload")).expect("JSON");
        assert_eq!(payload, serde_json::json!({"width": 640, "tags": ["a", "b"]}));
    }
}
