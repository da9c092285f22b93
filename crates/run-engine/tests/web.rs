//! `run-engine serve`: HTTP-level checks on every backend (escaping, the JSON API against
//! `status --json`, tokens, cross-site POSTs, actions), and browser tests in headless Chromium
//! through chromedriver on SQLite and PostgreSQL (a story turning completed live, a new log line
//! appearing, cancelling a run, text rendered as text). The browser tests write screenshots to
//! `target/web-artifacts/`.

mod common;

use common::{ExecProcess, cli, create, wait_for};
use run_engine_tests::{Backend, TestDb, each_backend};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use uuid::Uuid;

const XSS: &str = "<script>alert(1)</script>";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A child process killed when dropped.
struct Process {
    child: Child,
    stderr: PathBuf,
}

impl Process {
    fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `run-engine serve` on a free port; waits until it answers.
struct Serve {
    process: Process,
    port: u16,
}

impl Serve {
    async fn start(url: &str, dir: &Path, extra: &[&str]) -> Serve {
        let port = free_port();
        let listen = extra
            .iter()
            .position(|a| *a == "--listen")
            .and_then(|i| extra.get(i + 1))
            .map(|a| a.to_string())
            .unwrap_or_else(|| format!("127.0.0.1:{port}"));
        let port: u16 = listen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        let stderr = dir.join(format!("serve-{port}.err"));
        let mut command = Command::new(common::bin());
        command
            .arg("--database-url")
            .arg(url)
            .arg("serve")
            .env_remove("DATABASE_URL")
            .env_remove("RUN_ENGINE_WEB_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        if !extra.contains(&"--listen") {
            command.args(["--listen", &listen]);
        }
        command.args(extra);
        let child = command.spawn().expect("start run-engine serve");
        let mut serve = Serve {
            process: Process { child, stderr },
            port,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return serve;
            }
            if let Ok(Some(status)) = serve.process.child.try_wait() {
                panic!(
                    "run-engine serve exited with {status}: {}",
                    serve.process.stderr_text()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run-engine serve did not answer within 60 s: {}",
                serve.process.stderr_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// An HTTP answer: status, header block (lowercase names), body.
struct Answer {
    status: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// One HTTP/1.1 request with `Connection: close`.
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Answer {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        request.push_str("Content-Type: application/x-www-form-urlencoded\r\n");
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Answer {
        status,
        headers: head.to_owned(),
        body: body.to_owned(),
    }
}

fn get(port: u16, path: &str) -> Answer {
    http(port, "GET", path, &[], "")
}

/// The CSRF token in a page's forms.
fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with a csrf field")
        + 19;
    page[at..].split('"').next().expect("value").to_owned()
}

/// A plan whose stories print markup and colour.
fn write_plan(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("name = \"{name}\"\n{body}")).expect("write plan");
    path
}

const HOSTILE: &str = r#"title = "Hostile <b>plan</b>"
[[epics]]
key = "e"
title = "<script>alert(1)</script>"
[[epics.stories]]
key = "xss"
title = "<script>alert(1)</script>"
command = '''echo '<script>alert(1)</script>'; printf '\033[31mred\033[0m and \033[1mbold\033[0m\n'; printf 'bell\007\n' '''
"#;

each_backend! {
    async fn pages_escape_text_and_the_api_is_status_json(t) {
        let dir = tempfile::tempdir().expect("dir");
        let plan = write_plan(dir.path(), "hostile", HOSTILE);
        let (status, _, stderr) = cli(&t.url, &["run", plan.to_str().expect("utf-8")]);
        assert!(status.success(), "{stderr}");
        let (_, out, _) = cli(&t.url, &["runs", "--json"]);
        let runs: serde_json::Value = serde_json::from_str(&out).expect("runs json");
        let run_id: Uuid = runs[0]["id"].as_str().expect("id").parse().expect("uuid");
        let serve = Serve::start(&t.url, dir.path(), &[]).await;

        let list = get(serve.port, "/");
        assert_eq!(list.status, 200, "{}", list.body);
        assert!(list.body.contains(&run_id.to_string()), "{}", list.body);
        assert!(list.body.contains("Hostile &lt;b&gt;plan&lt;/b&gt;"), "{}", list.body);

        let page = get(serve.port, &format!("/runs/{run_id}"));
        assert_eq!(page.status, 200, "{}", page.body);
        assert!(page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{}", page.body);
        assert!(!page.body.contains(XSS), "{}", page.body);
        assert!(page.header("content-security-policy").is_some_and(|c| c.contains("script-src 'self'")));
        assert!(page.body.contains("<svg"), "the graph is drawn");

        let log = get(serve.port, &format!("/runs/{run_id}/log"));
        assert_eq!(log.status, 200, "{}", log.body);
        assert!(log.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{}", log.body);
        assert!(!log.body.contains(XSS), "{}", log.body);
        assert!(log.body.contains("<span class=\"fg-31\">red</span>"), "{}", log.body);
        assert!(log.body.contains("<span class=\"bold\">bold</span>"), "{}", log.body);
        assert!(log.body.contains("bell\\x07"), "{}", log.body);
        assert!(!log.body.contains('\u{1b}') && !log.body.contains('\u{7}'), "{}", log.body);

        // One story's lines only.
        let filtered = get(serve.port, &format!("/runs/{run_id}/log?story=e.xss"));
        assert!(filtered.body.contains("fg-31"), "{}", filtered.body);
        assert!(!filtered.body.contains("run hostile completed"), "{}", filtered.body);

        // The JSON API is what `status --json` prints.
        let api = get(serve.port, &format!("/api/runs/{run_id}"));
        assert_eq!(api.status, 200, "{}", api.body);
        let (status, json, stderr) = cli(&t.url, &["status", &run_id.to_string(), "--json"]);
        assert!(status.success(), "{stderr}");
        let from_api: serde_json::Value = serde_json::from_str(&api.body).expect("api json");
        let from_cli: serde_json::Value = serde_json::from_str(&json).expect("status json");
        assert_eq!(from_api, from_cli);

        // No page names the database (nor any password in its URL).
        for body in [&list.body, &page.body, &log.body, &api.body] {
            assert!(!body.contains(&t.url), "the database URL is shown");
        }
        assert_eq!(get(serve.port, &format!("/runs/{}", Uuid::new_v4())).status, 404);
        assert_eq!(get(serve.port, "/runs/nope").status, 404);
        assert_eq!(get(serve.port, &format!("/runs/{}/log/events", Uuid::new_v4())).status, 404);
        assert_eq!(get(serve.port, &format!("/api/runs/{}", Uuid::new_v4())).status, 404);
    }
}

/// The run ids a runs page lists, in order.
fn listed(body: &str) -> Vec<String> {
    body.split("<td class=\"id\"><code>")
        .skip(1)
        .filter_map(|rest| rest.split('<').next())
        .map(str::to_owned)
        .collect()
}

each_backend! {
    async fn runs_are_listed_newest_first_fifty_a_page(t) {
        let dir = tempfile::tempdir().expect("dir");
        let mut made = Vec::new();
        for i in 0..55 {
            let run = run_engine_tests::RunFactory::new().key(format!("r{i}")).create(&t.db).await;
            made.push(run.id().to_string());
        }
        let serve = Serve::start(&t.url, dir.path(), &[]).await;
        let first = get(serve.port, "/");
        let second = get(serve.port, "/?page=1");
        let (a, b) = (listed(&first.body), listed(&second.body));
        assert_eq!(a.len(), 50, "{}", first.body);
        assert_eq!(b.len(), 5, "{}", second.body);
        assert!(first.body.contains("href=\"/?page=1\""), "a link to older runs");
        assert!(second.body.contains("href=\"/?page=0\""), "a link to newer runs");
        let mut all: Vec<String> = a.iter().chain(&b).cloned().collect();
        // Newest first: the newest on the first page, the oldest on the second.
        assert!(a.contains(&made[54]) && b.contains(&made[0]), "{a:?} {b:?}");
        all.sort();
        made.sort();
        assert_eq!(all, made);
    }
}

const WAITING: &str = r#"[[epics]]
key = "e"
[[epics.stories]]
key = "first"
command = "true"
[[epics.stories]]
key = "second"
command = "true"
needs = ["first"]
"#;

each_backend! {
    async fn actions_need_a_same_origin_post_with_the_csrf_token(t) {
        let dir = tempfile::tempdir().expect("dir");
        let run_id = create(&t.url, &write_plan(dir.path(), "waiting", WAITING));
        let serve = Serve::start(&t.url, dir.path(), &[]).await;
        let page = get(serve.port, &format!("/runs/{run_id}"));
        assert!(page.body.contains("waits on e.first"), "{}", page.body);
        let csrf = csrf_of(&page.body);
        let pause = format!("/runs/{run_id}/pause");
        let form = format!("csrf={csrf}");
        let origin = serve.base();
        let refused = [
            http(serve.port, "POST", &pause, &[("Origin", "http://evil.example")], &form),
            http(serve.port, "POST", &pause, &[("Sec-Fetch-Site", "cross-site")], &form),
            http(serve.port, "POST", &pause, &[("Origin", &origin)], "csrf=wrong"),
            http(serve.port, "POST", &pause, &[("Origin", &origin)], ""),
            // DNS rebinding: another name for this address.
            http(serve.port, "POST", &pause, &[("Host", "evil.example"), ("Origin", "http://evil.example")], &form),
        ];
        for answer in &refused {
            assert_eq!(answer.status, 403, "{}", answer.body);
        }
        let run = entity::run::Entity::find_by_id(run_id);
        use sea_orm::EntityTrait;
        assert!(run.clone().one(&t.db).await.expect("read").expect("run").paused_at.is_none());

        let ok = http(serve.port, "POST", &pause, &[("Origin", &origin), ("Sec-Fetch-Site", "same-origin")], &form);
        assert_eq!(ok.status, 303, "{}", ok.body);
        assert_eq!(ok.header("location").as_deref(), Some(format!("/runs/{run_id}").as_str()));
        assert!(run.clone().one(&t.db).await.expect("read").expect("run").paused_at.is_some());
        let ok = http(serve.port, "POST", &format!("/runs/{run_id}/resume"), &[("Origin", &origin)], &form);
        assert_eq!(ok.status, 303, "{}", ok.body);
        assert!(run.clone().one(&t.db).await.expect("read").expect("run").paused_at.is_none());

        let ok = http(serve.port, "POST", &format!("/runs/{run_id}/stories/cancel"), &[("Origin", &origin)], &format!("{form}&story=e.first"));
        assert_eq!(ok.status, 303, "{}", ok.body);
        let stories = common::stories(&t.db, run_id).await;
        let status_of = |key: &str| stories.iter().find(|s| s.key == key).map(|s| s.status.clone());
        assert_eq!(status_of("first").as_deref(), Some("cancelled"));
        assert_eq!(status_of("second").as_deref(), Some("skipped"));

        let page = get(serve.port, &format!("/runs/{run_id}"));
        assert!(page.body.contains("class=\"skip-why\""), "why the story was skipped: {}", page.body);
        let missing = http(serve.port, "POST", &format!("/runs/{run_id}/stories/cancel"), &[("Origin", &origin)], &format!("{form}&story=e.nope"));
        assert!(missing.status == 404 || missing.status == 409, "{} {}", missing.status, missing.body);

        let ok = http(serve.port, "POST", &format!("/runs/{run_id}/cancel"), &[], &form);
        assert_eq!(ok.status, 303, "{}", ok.body);
        let api = get(serve.port, &format!("/api/runs/{run_id}"));
        let tree: serde_json::Value = serde_json::from_str(&api.body).expect("json");
        assert_eq!(tree["run"]["status"], "cancelled");
        // A finished run cannot be paused.
        let late = http(serve.port, "POST", &pause, &[("Origin", &origin)], &form);
        assert_eq!(late.status, 409, "{}", late.body);
    }
}

each_backend! {
    async fn a_public_address_needs_the_token_on_every_request(t) {
        let dir = tempfile::tempdir().expect("dir");
        let run_id = create(&t.url, &write_plan(dir.path(), "waiting", WAITING));
        // Refused without a token.
        let port = free_port();
        let (status, _, stderr) = cli(&t.url, &["serve", "--listen", &format!("0.0.0.0:{port}")]);
        assert!(!status.success());
        assert!(stderr.contains("--token"), "{stderr}");

        let token = "s3cret-token-0123456789";
        let port = free_port();
        let listen = format!("0.0.0.0:{port}");
        let serve = Serve::start(&t.url, dir.path(), &["--listen", &listen, "--token", token]).await;
        let path = format!("/runs/{run_id}");
        let refused = [
            http(serve.port, "GET", &path, &[], ""),
            http(serve.port, "GET", &path, &[("Authorization", "Bearer wrong-token-0123456789")], ""),
            http(serve.port, "GET", "/api/runs/x?token=wrong", &[], ""),
            http(serve.port, "GET", &format!("/runs/{run_id}/events"), &[], ""),
            http(serve.port, "GET", "/static/app.js", &[], ""),
        ];
        for answer in &refused {
            assert_eq!(answer.status, 401, "{}", answer.body);
        }
        let bearer = format!("Bearer {token}");
        let ok = http(serve.port, "GET", &path, &[("Authorization", &bearer)], "");
        assert_eq!(ok.status, 200, "{}", ok.body);
        // With any Host: the token is what counts.
        let ok = http(serve.port, "GET", &path, &[("Authorization", &bearer), ("Host", "runs.example:80")], "");
        assert_eq!(ok.status, 200, "{}", ok.body);

        let once = http(serve.port, "GET", &format!("{path}?token={token}"), &[], "");
        assert_eq!(once.status, 303, "{}", once.body);
        assert_eq!(once.header("location").as_deref(), Some(path.as_str()));
        let cookie = once.header("set-cookie").expect("a cookie");
        assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"), "{cookie}");
        let pair = cookie.split(';').next().expect("pair").to_owned();
        let ok = http(serve.port, "GET", &path, &[("Cookie", &pair)], "");
        assert_eq!(ok.status, 200, "{}", ok.body);

        // Even with the token, a cross-site POST is refused.
        let csrf = csrf_of(&ok.body);
        let cross = http(serve.port, "POST", &format!("{path}/pause"), &[("Cookie", &pair), ("Origin", "http://evil.example")], &format!("csrf={csrf}"));
        assert_eq!(cross.status, 403, "{}", cross.body);
        drop(serve);

        // Loopback without a token answers only to loopback names.
        let serve = Serve::start(&t.url, dir.path(), &[]).await;
        assert_eq!(http(serve.port, "GET", "/", &[("Host", "evil.example")], "").status, 403);
        assert_eq!(http(serve.port, "GET", "/", &[("Host", &format!("localhost:{}", serve.port))], "").status, 200);
    }
}

// --- Browser tests ---------------------------------------------------------------------------

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// Where screenshots go: `target/web-artifacts/`.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("web-artifacts");
    std::fs::create_dir_all(&dir).expect("artifacts dir");
    dir
}

/// chromedriver and a headless Chromium session, or `None` (outside CI) when not installed.
async fn browser(dir: &Path) -> Option<(Process, fantoccini::Client)> {
    if !Path::new(CHROMEDRIVER).exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{CHROMEDRIVER} is missing, but CI must run the browser tests: install chromium and chromium-driver"
        );
        let _ = std::io::stderr().write_all(
            b"skipped: chromium-driver not installed (apt-get install chromium chromium-driver)\n",
        );
        return None;
    }
    let port = free_port();
    let stderr = dir.join(format!("chromedriver-{port}.err"));
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).expect("stderr file"))
        .spawn()
        .expect("start chromedriver");
    let driver = Process { child, stderr };
    wait_for("chromedriver", Duration::from_secs(30), || async move {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .await;
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"],
        }),
    );
    let client =
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap_or_else(|e| panic!("cannot start Chromium: {e}; {}", driver.stderr_text()));
    Some((driver, client))
}

/// An attribute of the first element matching `css`, if any.
async fn attr(client: &fantoccini::Client, css: &str, name: &str) -> Option<String> {
    let element = client.find(fantoccini::Locator::Css(css)).await.ok()?;
    element.attr(name).await.ok().flatten()
}

async fn text_of(client: &fantoccini::Client, css: &str) -> String {
    match client.find(fantoccini::Locator::Css(css)).await {
        Ok(e) => e.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn wait_attr(client: &fantoccini::Client, what: &str, css: &str, name: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while attr(client, css, name).await.as_deref() != Some(want) {
        if std::time::Instant::now() > deadline {
            let url = client
                .current_url()
                .await
                .map(|u| u.to_string())
                .unwrap_or_default();
            let source = client.source().await.unwrap_or_default();
            panic!("timed out after 60 s waiting for {what} at {url}; the page:\n{source}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Marks the page; [`still_marked`] then tells that it was not reloaded.
async fn mark_page(client: &fantoccini::Client) {
    client
        .execute("window.__noReload = 42; return 0;", Vec::new())
        .await
        .expect("mark the page");
}

async fn still_marked(client: &fantoccini::Client) -> bool {
    client
        .execute("return window.__noReload === 42;", Vec::new())
        .await
        .ok()
        .and_then(|v| v.as_bool())
        == Some(true)
}

const LIVE: &str = r#"title = "Live plan"
[[epics]]
key = "e"
title = "Gated"
[[epics.stories]]
key = "gate"
title = "Waits for the test"
command = 'while [ ! -f "$MARKER_DIR/go" ]; do sleep 0.05; done; echo gate passed'
[[epics.stories]]
key = "after"
command = "echo after the gate"
needs = ["gate"]
[[epics.stories]]
key = "xss"
title = "<script>alert(1)</script>"
command = '''echo '<script>alert(1)</script>'; printf '\033[31mred\033[0m line\n' '''
[[epics.stories]]
key = "late"
command = 'while [ ! -f "$MARKER_DIR/go2" ]; do sleep 0.05; done; echo a late line'
[[epics.stories]]
key = "hold"
title = "Runs until cancelled"
command = 'while [ ! -f "$MARKER_DIR/never" ]; do sleep 0.05; done'
[[epics]]
key = "next"
title = "After the gate"
needs = ["e"]
[[epics.stories]]
key = "one"
command = "true"
"#;

async fn watch_a_run_in_the_browser(t: TestDb) {
    let dir = tempfile::tempdir().expect("dir");
    let Some((_driver, client)) = browser(dir.path()).await else {
        return;
    };
    let run_id = create(&t.url, &write_plan(dir.path(), "live", LIVE));
    let mut exec = ExecProcess::start(&t.url, run_id, 8, 30, dir.path());
    let serve = Serve::start(&t.url, dir.path(), &[]).await;
    let run_page = format!("{}/runs/{run_id}", serve.base());

    // A story turns completed without a reload.
    client.goto(&run_page).await.expect("open the run page");
    wait_attr(
        &client,
        "the gate running",
        "[id='story-e.gate']",
        "data-status",
        "running",
    )
    .await;
    wait_attr(
        &client,
        "the xss story completed",
        "[id='story-e.xss']",
        "data-status",
        "completed",
    )
    .await;
    wait_attr(
        &client,
        "the story after the gate waiting",
        "[id='story-e.after']",
        "data-status",
        "pending",
    )
    .await;
    // Stories running, completed and waiting: the screenshot the README shows.
    let shot = client.screenshot().await.expect("screenshot");
    std::fs::write(artifacts().join("run.png"), shot).expect("write run.png");
    assert!(
        text_of(&client, "[id='story-e.after'] .why")
            .await
            .contains("waits on e.gate")
    );
    mark_page(&client).await;
    std::fs::write(dir.path().join("go"), "").expect("open the gate");
    wait_attr(
        &client,
        "the gate completed, live",
        "[id='story-e.gate']",
        "data-status",
        "completed",
    )
    .await;
    wait_attr(
        &client,
        "the story after it completed, live",
        "[id='story-e.after']",
        "data-status",
        "completed",
    )
    .await;
    assert!(still_marked(&client).await, "the page was reloaded");
    // Titles are text, and no script ran.
    let title = text_of(&client, "[id='story-e.xss'] .title").await;
    assert_eq!(title, XSS);
    assert!(client.get_alert_text().await.is_err(), "an alert is open");
    assert!(
        client
            .find(fantoccini::Locator::Css(
                "svg.graph .story-node.st-completed"
            ))
            .await
            .is_ok(),
        "the graph shows completed stories"
    );

    // The log, live: a new line appears.
    client
        .goto(&format!("{run_page}/log"))
        .await
        .expect("open the log");
    wait_for("the coloured line", Duration::from_secs(30), || async {
        text_of(&client, "#log .fg-31").await == "red"
    })
    .await;
    let log_text = text_of(&client, "#log").await;
    assert!(log_text.contains(XSS), "{log_text}");
    assert!(
        !log_text.contains('\u{1b}') && !log_text.contains("[31m"),
        "{log_text}"
    );
    assert!(!log_text.contains("a late line"), "{log_text}");
    mark_page(&client).await;
    wait_for(
        "the log to be followed",
        Duration::from_secs(30),
        || async {
            text_of(&client, "#live-state").await.contains("live")
                && attr(&client, "#live-state", "class")
                    .await
                    .is_some_and(|c| c.contains("on"))
        },
    )
    .await;
    std::fs::write(dir.path().join("go2"), "").expect("let the late story print");
    wait_for("the late line, live", Duration::from_secs(30), || async {
        text_of(&client, "#log").await.contains("a late line")
    })
    .await;
    assert!(still_marked(&client).await, "the log page was reloaded");
    assert!(client.get_alert_text().await.is_err(), "an alert is open");
    let shot = client.screenshot().await.expect("screenshot");
    std::fs::write(artifacts().join("log.png"), shot).expect("write log.png");

    // One story's log.
    client
        .goto(&format!("{run_page}/log?story=e.late"))
        .await
        .expect("open the filtered log");
    wait_for("the late story's line", Duration::from_secs(30), || async {
        text_of(&client, "#log").await.contains("a late line")
    })
    .await;
    assert!(!text_of(&client, "#log").await.contains("gate passed"));

    // Cancel the run with its button.
    client.goto(&run_page).await.expect("open the run page");
    wait_attr(
        &client,
        "the run running",
        "#run-status",
        "data-status",
        "running",
    )
    .await;
    client
        .find(fantoccini::Locator::Css("#action-cancel"))
        .await
        .expect("the cancel button")
        .click()
        .await
        .expect("click cancel");
    wait_attr(
        &client,
        "the run cancelled",
        "#run-status",
        "data-status",
        "cancelled",
    )
    .await;
    wait_attr(
        &client,
        "the held story cancelled",
        "[id='story-e.hold']",
        "data-status",
        "cancelled",
    )
    .await;
    exec.wait(Duration::from_secs(60)).await;
    let _ = client.close().await;
}

mod browser {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        if let Some(t) = TestDb::migrated(Backend::Sqlite).await {
            watch_a_run_in_the_browser(t).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        if let Some(t) = TestDb::migrated(Backend::Postgres).await {
            watch_a_run_in_the_browser(t).await;
        }
    }
}

/// Opens a server-sent events stream; returns it once its headers came (status 200).
fn open_stream(port: u16, path: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("read the headers");
        assert_eq!(
            n,
            1,
            "the stream closed: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    stream
}

fn stats(port: u16) -> serde_json::Value {
    serde_json::from_str(&get(port, "/api/stats").body).expect("stats json")
}

each_backend! {
    async fn fifty_open_run_pages_share_one_poller(t) {
        let dir = tempfile::tempdir().expect("dir");
        let run_id = create(&t.url, &write_plan(dir.path(), "waiting", WAITING));
        let serve = Serve::start(&t.url, dir.path(), &[]).await;
        let runs: Vec<_> = (0..50).map(|_| open_stream(serve.port, &format!("/runs/{run_id}/events"))).collect();
        let logs: Vec<_> = (0..10).map(|_| open_stream(serve.port, &format!("/runs/{run_id}/log/events?after=0"))).collect();
        let before = stats(serve.port);
        assert_eq!(before["watched_runs"], 1, "{before}");
        // A measurement window, not a synchronisation: count the reads made during it.
        let window = Duration::from_secs(3);
        let started = std::time::Instant::now();
        tokio::time::sleep(window).await;
        let after = stats(serve.port);
        let secs = started.elapsed().as_secs_f64();
        let tree_reads = after["tree_reads"].as_u64().expect("n") - before["tree_reads"].as_u64().expect("n");
        let log_reads = after["log_reads"].as_u64().expect("n") - before["log_reads"].as_u64().expect("n");
        eprintln!("50 run pages and 10 log pages over {secs:.1} s: {tree_reads} tree reads, {log_reads} log reads");
        // One poller every 500 ms for the 50 pages (each read six queries); two reads a second
        // per log page.
        assert!(tree_reads as f64 <= secs * 2.0 + 2.0, "{tree_reads} tree reads in {secs:.1} s");
        assert!(log_reads as f64 <= secs * 2.0 * 10.0 + 20.0, "{log_reads} log reads in {secs:.1} s");
        drop(runs);
        drop(logs);
        // With no page left, the poller stops.
        wait_for("the poller to stop", Duration::from_secs(10), || async {
            stats(serve.port)["watched_runs"] == 0
        })
        .await;
    }
}
