//! `cargo xtask migrate` as a user meets it: `down` and `fresh` ask before they destroy data
//! (and refuse without a terminal unless `--yes`), and a database that cannot be reached is
//! one line naming it, the cause and a hint.

use run_engine_tests::each_backend;
use std::process::{Command, Output, Stdio};

fn xtask(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(std::env::temp_dir())
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run xtask")
}

/// `xtask <args>` on a pseudo-terminal (util-linux `script`) that is sent `answer` as typed.
fn xtask_on_a_terminal(args: &[&str], answer: &str) -> (bool, String) {
    use std::io::Write;
    let mut command = env!("CARGO_BIN_EXE_xtask").to_owned();
    for a in args {
        command.push_str(&format!(" '{a}'"));
    }
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .current_dir(std::env::temp_dir())
        .env_remove("DATABASE_URL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script (util-linux)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(answer.as_bytes())
        .expect("type the answer");
    let out = child.wait_with_output().expect("wait for script");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// How many migrations `migrate status` says are applied.
fn applied(url: &str) -> usize {
    let out = xtask(&["migrate", "status", "--database-url", url]);
    let shown = text(&out);
    shown
        .lines()
        .find_map(|l| l.strip_suffix(" pending"))
        .and_then(|l| l.split(" applied").next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in:\n{shown}"))
}

#[test]
fn down_and_fresh_ask_first_and_refuse_without_a_terminal_unless_yes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("x.db").display());
    let all = migration::migration_names().len();
    let up = xtask(&["migrate", "--database-url", &url]);
    assert!(up.status.success(), "{}", text(&up));
    assert_eq!(applied(&url), all);

    for action in [vec!["migrate", "fresh"], vec!["migrate", "down", "-n", "2"]] {
        let mut args = action.clone();
        args.extend(["--database-url", &url]);
        let out = xtask(&args);
        assert!(
            !out.status.success(),
            "{action:?} without a terminal must be refused"
        );
        let shown = text(&out);
        assert!(
            shown.contains("no terminal to ask on; pass --yes to do it without asking"),
            "{shown}"
        );
        assert_eq!(applied(&url), all, "{action:?} changed nothing");

        let (done, shown) = xtask_on_a_terminal(&args, "n\n");
        assert!(!done, "answered no: {shown}");
        assert!(shown.contains("Continue? [y/N]"), "{shown}");
        assert!(
            shown.contains("not confirmed: nothing was changed"),
            "{shown}"
        );
        assert_eq!(applied(&url), all, "{action:?} changed nothing");
    }

    let (done, shown) = xtask_on_a_terminal(
        &["migrate", "down", "-n", "2", "--database-url", &url],
        "y\n",
    );
    assert!(done, "{shown}");
    assert!(shown.contains("roll back 2 migrations on"), "{shown}");
    assert_eq!(applied(&url), all - 2);

    let out = xtask(&["migrate", "down", "--yes", "--database-url", &url]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(applied(&url), all - 3);

    let out = xtask(&["migrate", "fresh", "-y", "--database-url", &url]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(applied(&url), all);
}

#[test]
fn a_server_that_does_not_listen_is_named_in_one_line_at_once() {
    // Port 9 on loopback: nothing listens. The pool alone would wait 30 s and say it timed out.
    let out = xtask(&[
        "migrate",
        "status",
        "--database-url",
        "postgres://app:hunter2@127.0.0.1:9/runs",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim(),
        "error: cannot connect to postgres://app:***@127.0.0.1:9/runs: the server 127.0.0.1:9 \
         cannot be reached: connection refused (is the server running and listening on port 9?)"
    );
}

each_backend! {
    /// A database that does not exist (a SQLite file in a folder that does not exist): one line
    /// with the server, the cause and a hint, none of the driver's wrappers, no password.
    async fn a_missing_database_is_one_line_with_a_hint(t) {
        let dir = tempfile::tempdir().expect("temp dir");
        let (url, cause, hint) = match t.backend {
            run_engine_tests::Backend::Sqlite => (
                format!("sqlite://{}?mode=rwc", dir.path().join("nowhere").join("x.db").display()),
                "unable to open database file",
                "exist, and may this user write there?)",
            ),
            run_engine_tests::Backend::Postgres => {
                let mut url = url::Url::parse(&t.url).expect("url");
                url.set_path("/run_engine_no_such_db");
                let _ = url.set_password(Some("hunter2"));
                (url.to_string(), "database \"run_engine_no_such_db\" does not exist", "(create it")
            }
            run_engine_tests::Backend::MySql => {
                let mut url = url::Url::parse(&t.url).expect("url");
                url.set_path("/run_engine_no_such_db");
                (url.to_string(), "Unknown database 'run_engine_no_such_db'", "(create it")
            }
        };
        let out = xtask(&["migrate", "status", "--database-url", &url]);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("error: cannot connect to "), "{stderr}");
        assert!(stderr.contains(cause) && stderr.contains(hint), "{stderr}");
        for noise in ["Connection Error", "error returned from database", "at line", "Custom Error", "hunter2"] {
            assert!(!stderr.contains(noise), "{noise:?} in {stderr}");
        }
    }
}
