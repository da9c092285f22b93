//! `cargo xtask migrate`: apply, roll back and inspect migrations.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use run_domain::{DEFAULT_DATABASE_URL, connect, redact_url};

/// Arguments of `cargo xtask migrate`.
#[derive(Args)]
pub struct MigrateArgs {
    /// Database URL; else `DATABASE_URL` (a `.env` file is honoured); else the embedded SQLite
    /// file `run-engine.db` in the working directory.
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    action: Option<Action>,
}

#[derive(Subcommand)]
enum Action {
    /// Apply every pending migration (the default).
    Up {
        /// Apply only the first N pending migrations.
        #[arg(short = 'n', long)]
        steps: Option<u32>,
    },
    /// Roll back the last N applied migrations (default 1).
    Down {
        /// How many to roll back.
        #[arg(short = 'n', long, default_value_t = 1)]
        steps: u32,
    },
    /// List every migration and whether it is applied (like `prisma migrate status`); exits
    /// non-zero when some are pending.
    Status,
    /// Drop every table and apply every migration again. Destroys all data.
    Fresh,
}

/// Resolves the database URL: flag, then `DATABASE_URL`, then the embedded default.
pub fn database_url(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// Runs `cargo xtask migrate`.
pub async fn run(args: MigrateArgs) -> Result<()> {
    let url = database_url(args.database_url);
    let shown = redact_url(&url);
    let db = connect(&url).await.context("connecting for migrate")?;
    println!("database: {shown}");
    match args.action.unwrap_or(Action::Up { steps: None }) {
        Action::Up { steps } => {
            let applied = migration::apply(&db, steps)
                .await
                .with_context(|| format!("applying migrations to {shown}"))?;
            if applied.is_empty() {
                println!("nothing to apply: the schema is up to date");
            }
            for name in &applied {
                println!("applied  {name}");
            }
            print_status(&db, &shown).await?;
        }
        Action::Down { steps } => {
            let rolled = migration::rollback(&db, Some(steps))
                .await
                .with_context(|| format!("rolling back migrations on {shown}"))?;
            if rolled.is_empty() {
                println!("nothing to roll back");
            }
            for name in &rolled {
                println!("rolled back  {name}");
            }
            print_status(&db, &shown).await?;
        }
        Action::Status => {
            let pending = print_status(&db, &shown).await?;
            if pending > 0 {
                anyhow::bail!("{pending} migration(s) pending: run `cargo xtask migrate`");
            }
        }
        Action::Fresh => {
            let applied = migration::fresh(&db)
                .await
                .with_context(|| format!("recreating the schema on {shown}"))?;
            println!("dropped every table");
            for name in &applied {
                println!("applied  {name}");
            }
        }
    }
    Ok(())
}

async fn print_status(db: &sea_orm::DatabaseConnection, shown: &str) -> Result<usize> {
    let status = migration::status(db)
        .await
        .with_context(|| format!("reading migration status of {shown}"))?;
    let pending = status.iter().filter(|(_, applied)| !applied).count();
    println!("status:");
    for (name, applied) in &status {
        println!("  {}  {name}", if *applied { "applied" } else { "pending" });
    }
    println!("{} applied, {pending} pending", status.len() - pending);
    Ok(pending)
}
