//! `ember`: the operator and debugging CLI of the Ember runtime. It reads
//! the same config as the shim (`/etc/ember/config.toml`, `EMBER_CONFIG`)
//! and boots VMs through the same code path as the shim's pods. One module
//! per subcommand; `ember --help` and `ember <command> --help` list them.

mod bench;
mod check;
mod templates;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use ember_shim::config::Config;

/// The Ember runtime's operator CLI: config, host checks, VM templates and
/// benchmarks. The config is /etc/ember/config.toml, or the file named by
/// EMBER_CONFIG.
#[derive(Debug, Parser)]
#[command(name = "ember", version = ember_shim::VERSION, disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the effective config (TOML) and where it came from.
    Config,
    /// Check KVM, the guest kernel and initrd, the CPU template, the state
    /// dir and containerd's registration of Ember; exits 1 if one fails.
    Check,
    /// Measure boots and pod starts (no containerd involved).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// List (default) or drop the VM templates.
    Templates {
        #[command(subcommand)]
        command: Option<templates::TemplatesCommand>,
    },
    /// Print Ember's version.
    Version,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version print and exit 0; bad usage exits 2.
        Err(e) => e.exit(),
    };
    let result: Result<ExitCode> = match cli.command {
        Command::Config => cmd_config(),
        Command::Check => check::run(),
        Command::Bench(b) => bench::run(b),
        Command::Templates { command } => templates::run(command.unwrap_or_default()),
        Command::Version => {
            println!("ember {}", ember_shim::VERSION);
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ember: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn cmd_config() -> Result<ExitCode> {
    let (config, source) = Config::load()?;
    println!("# Ember config: {source}");
    print!("{}", config.to_toml());
    Ok(ExitCode::SUCCESS)
}

/// Bytes as MiB with one decimal, for the tables subcommands print.
fn mib(bytes: u64) -> String {
    format!("{:.1}MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn subcommands_parse_and_bad_usage_is_refused() {
        let cli = Cli::try_parse_from(["ember", "templates"]).unwrap();
        assert!(matches!(cli.command, Command::Templates { command: None }));
        let cli = Cli::try_parse_from(["ember", "templates", "drop", "--all"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Templates {
                command: Some(templates::TemplatesCommand::Drop {
                    all: true,
                    id: None
                })
            }
        ));
        for bad in [
            vec!["ember"],
            vec!["ember", "frobnicate"],
            vec!["ember", "templates", "drop"],
            vec!["ember", "templates", "drop", "x", "--all"],
            vec!["ember", "bench", "boot", "--fast"],
        ] {
            let e = Cli::try_parse_from(&bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?} gave {e}");
        }
    }
}
