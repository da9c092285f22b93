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
    /// Do not ask before `down` or `fresh` destroy data (needed when there is no terminal to
    /// ask on, as in scripts and CI)
    #[arg(long, short = 'y', global = true)]
    yes: bool,
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
    /// Roll back the last N applied migrations (default 1), dropping what they added with its
    /// data. Asks first on a terminal; refused without one unless `--yes`.
    Down {
        /// How many to roll back.
        #[arg(short = 'n', long, default_value_t = 1)]
        steps: u32,
    },
    /// List every migration and whether it is applied (like `prisma migrate status`); exits
    /// non-zero when some are pending.
    Status,
    /// Drop every table and apply every migration again. Destroys all data. Asks first on a
    /// terminal (like `prisma migrate reset`); refused without one unless `--yes`.
    Fresh,
}

/// Resolves the database URL: flag, then `DATABASE_URL`, then the embedded default.
pub fn database_url(flag: Option<String>) -> String {
    flag.or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// Runs `cargo xtask migrate`.
pub async fn run(args: MigrateArgs) -> Result<()> {
    let url = database_url(args.database_url.clone());
    let shown = redact_url(&url);
    // The error names the database (password hidden) and why; nothing to add.
    let db = connect(&url).await?;
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
            let applied: Vec<String> = migration::status(&db)
                .await
                .with_context(|| format!("reading migration status of {shown}"))?
                .into_iter()
                .filter(|(_, applied)| *applied)
                .map(|(name, _)| name)
                .collect();
            let last: Vec<&str> = applied
                .iter()
                .rev()
                .take(usize::try_from(steps).unwrap_or(usize::MAX))
                .map(String::as_str)
                .collect();
            if !last.is_empty() {
                confirm(
                    &format!(
                        "roll back {} on {shown} ({}), dropping what {} added and the data in it",
                        plural(last.len(), "migration"),
                        last.join(", "),
                        if last.len() == 1 { "it" } else { "they" }
                    ),
                    args.yes,
                )?;
            }
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
            confirm(
                &format!("drop every table of {shown} with all its data, then migrate again"),
                args.yes,
            )?;
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

/// `n thing` or `n things`.
fn plural(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// Asks on the terminal before `action` destroys data; `yes` skips the question. Without a
/// terminal on standard input the action is refused: nobody is there to answer, and a script
/// that means it says `--yes`.
fn confirm(action: &str, yes: bool) -> Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        anyhow::bail!(
            "refused to {action}: no terminal to ask on; pass --yes to do it without asking"
        );
    }
    eprint!("This will {action}.\nContinue? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    match answer.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(()),
        _ => anyhow::bail!("not confirmed: nothing was changed"),
    }
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
