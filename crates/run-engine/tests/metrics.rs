//! `run-engine exec --metrics ADDR` serves Prometheus text: scraped after 50 stories of which
//! 5 failed, it shows those counts (the process stays up: one more story waits behind a shut
//! limit until the run is cancelled).

mod common;

use common::{ExecProcess, cli, create, wait_for};
use run_engine_tests::each_backend;
use std::io::{Read, Write};
use std::time::Duration;

/// GET `/metrics` on `port`; the body, or empty when nothing answers yet.
fn scrape(port: u16) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return String::new();
    }
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text
}

/// The value of the sample `name` (no labels), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

each_backend! {
    async fn the_metrics_endpoint_counts_completed_and_failed_stories(t) {
        let dir = tempfile::tempdir().expect("dir");
        let mut text = String::from("name = \"counted\"\n[limits]\nshut = 0\n[[epics]]\nkey = \"e\"\n");
        for i in 0..50 {
            let command = if i % 10 == 3 { "exit 1" } else { "true" };
            text.push_str(&format!("[[epics.stories]]\nkey = \"s{i}\"\ncommand = \"{command}\"\n"));
        }
        text.push_str("[[epics.stories]]\nkey = \"last\"\ncommand = \"true\"\nlimits = [\"shut\"]\n");
        let plan = dir.path().join("counted.toml");
        std::fs::write(&plan, text).expect("write plan");
        let run_id = create(&t.url, &plan);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut exec = ExecProcess::start_with(&t.url, run_id, 4, 30, dir.path(), &["--metrics", &addr]);
        wait_for("the counts on the metrics endpoint", Duration::from_secs(60), || async move {
            let text = scrape(port);
            // Log lines are written in batches up to `LogSink::BATCH_DELAY` after the results
            // (which a fast run records sooner): their counter is waited for as well.
            sample(&text, "run_engine_stories_completed_total") == Some(45.0)
                && sample(&text, "run_engine_stories_failed_total") == Some(5.0)
                && sample(&text, "run_engine_log_lines_total").is_some_and(|n| n >= 5.0)
        })
        .await;
        let text = scrape(port);
        assert_eq!(sample(&text, "run_engine_stories_claimed_total"), Some(50.0), "{text}");
        assert!(text.contains("# TYPE run_engine_attempt_duration_seconds summary")
            || text.contains("# TYPE run_engine_attempt_duration_seconds histogram"), "{text}");
        let (status, _, stderr) = cli(&t.url, &["cancel", &run_id.to_string()]);
        assert!(status.success(), "{stderr}");
        exec.wait(Duration::from_secs(60)).await;
    }
}
