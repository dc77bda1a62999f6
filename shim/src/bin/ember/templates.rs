//! `ember templates`: the VM templates pods start from (`template_dir`):
//! list them with their size on disk, or drop one (its pods make it again)
//! or all of them.

use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;
use ember_shim::config::Config;
use ember_shim::resources::sizing::VmSize;
use ember_shim::sandbox::paths::SandboxPaths;
use ember_shim::sandbox::{vm_config, SandboxSetup};
use ember_shim::templates::{self, TemplateStore};

use crate::mib;

#[derive(Debug, Default, Subcommand)]
pub enum TemplatesCommand {
    /// List the templates: identity, size on disk, total; `*` marks the
    /// one of a default-sized pod.
    #[default]
    List,
    /// Remove one template (pods of its identity make it again), or every
    /// template with --all.
    Drop {
        /// The template's identity, as `ember templates list` shows it.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// Remove every template.
        #[arg(long)]
        all: bool,
    },
}

pub fn run(command: TemplatesCommand) -> Result<ExitCode> {
    match command {
        TemplatesCommand::List => list(),
        TemplatesCommand::Drop { id, .. } => drop(id.as_deref()),
    }
}

/// The template identity of a default-sized pod under `config`.
fn default_identity(config: &Config) -> Result<String> {
    let paths = SandboxPaths::new(&config.state_dir, "ember", "template-probe");
    let setup = SandboxSetup {
        namespace: "ember".into(),
        id: "template-probe".into(),
        size: VmSize {
            vcpus: config.default_vcpus,
            mem_mib: config.default_memory_mib,
        },
        kernel_params: None,
        netns: None,
        hostname: None,
    };
    Ok(templates::identity(&vm_config(config, &paths, &setup))?)
}

fn list() -> Result<ExitCode> {
    let (config, _) = Config::load()?;
    let store = TemplateStore::new(&config.template_dir);
    let current = default_identity(&config).ok();
    println!(
        "# VM templates in {} ({})",
        store.dir().display(),
        if config.templates {
            "templates on"
        } else {
            "templates off in the config"
        }
    );
    let list = store.list();
    for t in &list {
        let mark = if current.as_deref() == Some(t.identity.as_str()) {
            "*"
        } else {
            " "
        };
        println!(
            "{mark} {}  {:>10}  {}",
            t.identity,
            mib(t.disk_bytes),
            t.dir.display()
        );
    }
    println!(
        "{} template(s), {} on disk in {}",
        list.len(),
        mib(store.disk_bytes()),
        store.dir().display()
    );
    Ok(ExitCode::SUCCESS)
}

fn drop(id: Option<&str>) -> Result<ExitCode> {
    let (config, _) = Config::load()?;
    let store = TemplateStore::new(&config.template_dir);
    match id {
        None => {
            let n = store.list().len();
            store.clear()?;
            println!("dropped {n} template(s) from {}", store.dir().display());
        }
        Some(id) => {
            if id.contains('/') || id.starts_with('.') || store.get(id).is_none() {
                bail!("no template {id:?} in {}", store.dir().display());
            }
            store.discard(id)?;
            // A pod may try this identity again.
            store.unmark_broken(id)?;
            println!("dropped template {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
