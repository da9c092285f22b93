//! A database server of the test's own, on its own port and data directory, that the test may
//! kill, restart and cut connections of without touching the shared servers.
//!
//! PostgreSQL: `initdb` and `pg_ctl` from `/usr/lib/postgresql/<version>/bin`, run as the
//! `postgres` user when the test runs as root. MariaDB: `mariadb-install-db` and `mariadbd`, run
//! as the `mysql` user. Both listen on 127.0.0.1 only, with fsync off (the tests restart them
//! cleanly; durability across power loss is not what they test).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Backend;
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement};

/// A private server; stopped and its files removed on drop.
pub struct PrivateServer {
    backend: Backend,
    dir: PathBuf,
    port: u16,
    bin: PathBuf,
    child: Option<Child>,
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs `program args` as `user` when we are root (servers refuse to run as root).
fn command_as(user: &str, program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", user, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn chown_to(user: &str, dir: &Path) -> Result<(), String> {
    if !is_root() {
        return Ok(());
    }
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:{user}"))
        .arg(dir)
        .status()
        .map_err(|e| format!("chown: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("chown {user} {} failed", dir.display()))
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("local_addr: {e}"))
}

fn run(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{what}: cannot start: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl PrivateServer {
    /// Creates and starts a private PostgreSQL server.
    pub fn postgres() -> Result<PrivateServer, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("PostgreSQL binaries not found in /usr/lib/postgresql: {e}"))?
            .flatten()
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .ok_or("no initdb under /usr/lib/postgresql/*/bin")?;
        let dir = std::env::temp_dir().join(format!("re-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir: {e}"))?;
        chown_to("postgres", &dir)?;
        let mut initdb = command_as("postgres", &bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        run(initdb, "initdb")?;
        let mut server = PrivateServer {
            backend: Backend::Postgres,
            dir,
            port: free_port()?,
            bin,
            child: None,
        };
        server.start()?;
        Ok(server)
    }

    /// Creates and starts a private MariaDB server.
    pub fn mariadb() -> Result<PrivateServer, String> {
        let dir = std::env::temp_dir().join(format!("re-my-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir: {e}"))?;
        chown_to("mysql", &dir)?;
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if is_root() {
            install.arg("--user=mysql");
        }
        run(install, "mariadb-install-db")?;
        let mut server = PrivateServer {
            backend: Backend::MySql,
            dir,
            port: free_port()?,
            bin: PathBuf::from("/usr/sbin/mariadbd"),
            child: None,
        };
        server.start()?;
        Ok(server)
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The URL of the server's administrative database.
    pub fn url(&self) -> String {
        match self.backend {
            Backend::Postgres => format!("postgres://postgres@127.0.0.1:{}/postgres", self.port),
            _ => format!("mysql://root@127.0.0.1:{}/mysql", self.port),
        }
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start(&mut self) -> Result<(), String> {
        match self.backend {
            Backend::Postgres => {
                let mut c = command_as("postgres", &self.bin.join("pg_ctl"));
                c.arg("-D")
                    .arg(self.dir.join("data"))
                    .arg("-l")
                    .arg(self.dir.join("log"))
                    .arg("-o")
                    .arg(format!(
                        "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                        self.port,
                        self.dir.display()
                    ))
                    .args(["-w", "start"]);
                run(c, "pg_ctl start")?;
            }
            _ => {
                let mut c = Command::new(&self.bin);
                c.arg("--no-defaults")
                    .arg(format!("--datadir={}", self.dir.join("data").display()))
                    .arg(format!("--port={}", self.port))
                    .arg(format!("--socket={}", self.dir.join("sock").display()))
                    .arg(format!(
                        "--log-error={}",
                        self.dir.join("err.log").display()
                    ))
                    .args([
                        "--bind-address=127.0.0.1",
                        "--max-connections=300",
                        "--innodb-flush-log-at-trx-commit=2",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                if is_root() {
                    c.arg("--user=mysql");
                }
                self.child = Some(c.spawn().map_err(|e| format!("mariadbd: {e}"))?);
            }
        }
        self.wait_ready()
    }

    fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(format!(
            "{:?} on port {} did not start within 60 s",
            self.backend, self.port
        ))
    }

    /// Stops the server (fast shutdown: open connections are cut).
    pub fn stop(&mut self) -> Result<(), String> {
        match self.backend {
            Backend::Postgres => {
                let mut c = command_as("postgres", &self.bin.join("pg_ctl"));
                c.arg("-D")
                    .arg(self.dir.join("data"))
                    .args(["-m", "fast", "-w", "stop"]);
                run(c, "pg_ctl stop")
            }
            _ => {
                if let Some(mut child) = self.child.take() {
                    let _ = Command::new("kill")
                        .arg("-TERM")
                        .arg(child.id().to_string())
                        .status();
                    child
                        .wait()
                        .map_err(|e| format!("waiting for mariadbd: {e}"))?;
                }
                Ok(())
            }
        }
    }

    /// Stops and starts the server again, on the same port and data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop()?;
        self.start()
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Kills every connection to `db_name` except the killer's own; returns how many.
pub async fn kill_connections(admin: &DatabaseConnection, db_name: &str) -> u32 {
    let backend = admin.get_database_backend();
    match backend {
        DbBackend::Postgres => {
            let rows = admin
                .query_all_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT pg_terminate_backend(pid) AS k FROM pg_stat_activity \
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    [db_name.into()],
                ))
                .await
                .unwrap_or_default();
            rows.len() as u32
        }
        _ => {
            let ids = admin
                .query_all_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT id FROM information_schema.processlist WHERE db = ? AND id <> CONNECTION_ID()",
                    [db_name.into()],
                ))
                .await
                .unwrap_or_default();
            let mut n = 0;
            for row in ids {
                if let Ok(id) = row.try_get::<i64>("", "id")
                    && admin
                        .execute_unprepared(&format!("KILL {id}"))
                        .await
                        .is_ok()
                {
                    n += 1;
                }
            }
            n
        }
    }
}

/// The database named in `url`'s path.
pub fn database_name(url: &str) -> String {
    url::Url::parse(url)
        .map(|u| u.path().trim_start_matches('/').to_owned())
        .unwrap_or_default()
}
