//! Bad input and security through the domain API: typed errors, nothing stored harmed, every
//! text stored verbatim (every statement is parameterised), no password in any output.

use entity::{run, run_epic, run_story};
use run_domain::{
    Changes, ConnectError, LogCursor, VersionedUpdate, append_run_logs, connect,
    read_run_log_after, redact_text, redact_url,
};
use run_engine_tests::{Backend, RunFactory, each_backend, table_counts};

const INJECTIONS: &[&str] = &[
    "'; DROP TABLE run; --",
    "\" OR 1=1 --",
    "x'); DELETE FROM run_story WHERE ('1'='1",
    "$$; DROP TABLE run_log; $$",
    "`; DROP TABLE run_epic; #",
    "\\'; TRUNCATE run_log_head; -- \\",
    "Robert'); DROP TABLE seaql_migrations;--",
];

each_backend! {
    async fn sql_injection_strings_in_every_text_field_are_stored_verbatim(t) {
        for evil in INJECTIONS {
            let created = RunFactory::new().key(*evil).title(*evil).epic(*evil).story(evil, evil, 1)
                .create(&t.db).await;
            let (run, epic, ids) = (created.run, &created.epics[0], created.stories);
            let story = run_story::Entity::find_versioned(&t.db, ids[0]).await.expect("read story");
            let story = run_story::Entity::update_versioned(&t.db, story.id, story.version,
                Changes::new().set(run_story::Column::Error, Some(evil.to_string()))
                    .set(run_story::Column::LeaseOwner, Some(evil.to_string())))
                .await.expect("update");
            append_run_logs(&t.db, run.id, [*evil, *evil]).await.expect("append");

            let r = run::Entity::find_versioned(&t.db, run.id).await.expect("run back");
            let e = run_epic::Entity::find_versioned(&t.db, epic.id).await.expect("epic back");
            assert_eq!((r.key.as_str(), r.title.as_str()), (*evil, *evil));
            assert_eq!((e.key.as_str(), e.title.as_str()), (*evil, *evil));
            for field in [&story.key, &story.title] {
                assert_eq!(field, evil);
            }
            for field in [&story.command, &story.error, &story.lease_owner] {
                assert_eq!(field.as_deref(), Some(*evil));
            }
            let lines = read_run_log_after(&t.db, run.id, LogCursor::START, 10).await.expect("log");
            assert!(lines.entries.iter().all(|l| l.message == *evil));
        }
        let n = INJECTIONS.len() as i64;
        let counts = table_counts(&t.db).await;
        let expect = |table: &str| counts.iter().find(|(t, _)| *t == table).map(|(_, n)| *n);
        assert_eq!(expect("run"), Some(n));
        assert_eq!(expect("run_epic"), Some(n));
        assert_eq!(expect("run_story"), Some(n));
        assert_eq!(expect("run_log_head"), Some(n));
        assert_eq!(expect("run_log"), Some(2 * n));
        assert_eq!(expect("seaql_migrations"), Some(migration::migration_names().len() as i64));
    }
}

#[tokio::test]
async fn a_url_with_a_wrong_scheme_is_refused_by_name() {
    match connect("redis://user:hunter2@127.0.0.1:6379/0").await {
        Err(e @ ConnectError::UnsupportedScheme { .. }) => {
            let shown = format!("{e} {e:?}");
            assert!(shown.contains("redis"), "{shown}");
            assert!(!shown.contains("hunter2"), "password leaked: {shown}");
        }
        other => panic!("expected UnsupportedScheme, got {other:?}"),
    }
    assert!(matches!(
        connect("not a url").await,
        Err(ConnectError::InvalidUrl { .. })
    ));
    // A URL the driver cannot parse: the driver quotes it, the password must not survive.
    for url in [
        "postgres://u:hunter2@[host/db",
        "mysql://u:hunter2@host:notaport/db",
    ] {
        let err = connect(url).await.expect_err("unparseable");
        let mut shown = format!("{err} {err:?}");
        let mut source = std::error::Error::source(&err);
        while let Some(s) = source {
            shown.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        assert!(!shown.contains("hunter2"), "password leaked: {shown}");
    }
}

#[tokio::test]
async fn an_unreachable_host_fails_naming_it_without_the_password() {
    // Port 9 on loopback: nothing listens, the connection is refused at once.
    let err = connect("postgres://app:hunter2@127.0.0.1:9/runs")
        .await
        .expect_err("nothing listens there");
    let shown = format!("{err} {err:?}");
    assert!(shown.contains("127.0.0.1:9"), "{shown}");
    assert!(!shown.contains("hunter2"), "password leaked: {shown}");
}

#[tokio::test]
async fn a_wrong_password_fails_without_printing_it() {
    let Some(server) = Backend::MySql.server_url() else {
        return;
    };
    let mut url = url::Url::parse(&server).expect("server url");
    url.set_password(Some("wrong-hunter2"))
        .expect("set password");
    let err = connect(url.as_str())
        .await
        .expect_err("wrong password must fail");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("wrong-hunter2"), "password leaked: {shown}");
    assert!(
        shown.contains("***"),
        "the redacted URL names the server: {shown}"
    );
}

#[test]
fn redaction_hides_passwords_in_every_url_shape() {
    for url in [
        "postgres://u:hunter2@h/db",
        "mysql://root:hunter2@127.0.0.1:3306/test?ssl-mode=disabled",
        "postgresql://u:hunter2@h:5432",
        "postgres://u:hun%40ter2@h/db",
    ] {
        let shown = redact_url(url);
        assert!(
            !shown.contains("hunter2") && !shown.contains("hun%40ter2"),
            "{shown}"
        );
        assert!(shown.contains("***"), "{shown}");
    }
    assert!(!redact_url("postgres://u:hunter2@[bad").contains("hunter2"));
}

/// Passwords that occur inside other words of the message, inside the host, or are made of
/// characters that must be percent-encoded in a URL.
const TRICKY_PASSWORDS: [&str; 6] = ["o", "ab", "postgres", "error", "127", "p%40ss%3Aw%2Frd"];

/// Everything `connect` says about a failure, causes included.
async fn connect_error_text(url: &str) -> String {
    let err = connect(url).await.expect_err("nothing listens there");
    let mut shown = format!("{err} | {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        shown.push_str(&format!(" | {s} | {s:?}"));
        source = s.source();
    }
    shown
}

#[tokio::test]
async fn redaction_goes_by_structure_so_short_passwords_garble_nothing() {
    // URLs the driver cannot parse: it quotes them whole in its error. (An unreachable server
    // is tried until the pool's acquire timeout; the CLI test covers that message.)
    for shape in [
        "postgres://postgres:{}@[db/runs",
        "mysql://root:{}@db:notaport/test",
    ] {
        let reference = connect_error_text(&shape.replace("{}", "zq9xw")).await;
        let reference = reference.replace("zq9xw", "***");
        for password in TRICKY_PASSWORDS {
            let url = shape.replace("{}", password);
            let shown = connect_error_text(&url).await;
            // Exactly the message a password with no common letters gets: nothing garbled,
            // nothing given away by position.
            assert_eq!(shown, reference, "password {password:?} in {url}");
            assert!(!shown.contains(&format!(":{password}@")), "{shown}");
        }
    }
}

#[test]
fn redact_text_replaces_only_passwords() {
    assert_eq!(
        redact_text("Connection Error: 'postgres://postgres:o@localhost/o' refused"),
        "Connection Error: 'postgres://postgres:***@localhost/o' refused"
    );
    assert_eq!(
        redact_text("a postgres://u:p%40ss%3Aw%2Frd@h/db and mysql://v:127@127.0.0.1:3306/x"),
        "a postgres://u:***@h/db and mysql://v:***@127.0.0.1:3306/x"
    );
    // A raw '@' or '/' in a password (an invalid URL a user may still type) stays hidden.
    assert_eq!(
        redact_text("postgres://u:p@ss@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(
        redact_text("postgres://u:p/ss@h/db"),
        "postgres://u:***@h/db"
    );
    assert_eq!(
        redact_text("PgConnectOptions { host: \"h\", password: Some(\"error\"), user: \"u\" }"),
        "PgConnectOptions { host: \"h\", password: Some(\"***\"), user: \"u\" }"
    );
    assert_eq!(
        redact_text("host=h password=127 dbname=x"),
        "host=h password=*** dbname=x"
    );
    for untouched in [
        "no passwords here: error 127 at postgres://postgres@h/o",
        "Access denied for user 'root'@'localhost' (using password: YES)",
        "sqlite://run-engine.db?mode=rwc",
    ] {
        assert_eq!(redact_text(untouched), untouched);
    }
}
