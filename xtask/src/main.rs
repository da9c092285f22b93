//! `cargo xtask`: run-engine's own commands.
//!
//! | Prisma                  | run-engine                        |
//! |-------------------------|-----------------------------------|
//! | `prisma migrate deploy` | `cargo xtask migrate` (`up`)      |
//! | `prisma migrate status` | `cargo xtask migrate status`      |
//! | `prisma migrate reset`  | `cargo xtask migrate fresh`       |
//! | `prisma generate`       | `cargo xtask codegen`             |
//! | `prisma validate`       | `cargo xtask codegen --check`     |

mod codegen;
mod migrate;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// run-engine's project commands.
///
/// Equivalents for Prisma users: `prisma migrate deploy` is `cargo xtask migrate`,
/// `prisma migrate status` is `cargo xtask migrate status`, `prisma migrate reset` is
/// `cargo xtask migrate fresh`, `prisma generate` is `cargo xtask codegen`, and
/// `prisma validate` is `cargo xtask codegen --check`.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply, roll back or inspect migrations (like `prisma migrate deploy|status|reset`).
    Migrate(migrate::MigrateArgs),
    /// Regenerate `entity/` from the migrated schema (like `prisma generate`); with `--check`,
    /// fail if it has drifted (like `prisma validate`).
    Codegen(codegen::CodegenArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // A `.env` file in the working directory may set DATABASE_URL.
    let _ = dotenvy::dotenv();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Migrate(args) => migrate::run(args).await,
        Command::Codegen(args) => codegen::run(args).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The same one line `run-engine` prints: each cause once, passwords hidden.
            eprintln!("error: {}", run_domain::describe(err.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
