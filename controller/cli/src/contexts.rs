//! `shoalctl config …` and the choice of credentials: `--config FILE` (or `SHOAL_CONFIG`), a named
//! context (`--context NAME` or `SHOAL_CONTEXT`), or the current context of the shoalctl config
//! file (`shoal_api::contexts`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Subcommand;
use serde::Serialize;
use shoal_api::{
    contexts::{check_context_name, default_path, ContextEntry, ContextsFile},
    AdminConf,
};

use crate::output::Out;

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Every context, the current one marked.
    #[command(alias = "contexts")]
    GetContexts,
    /// The current context's name.
    CurrentContext,
    /// Make NAME the current context.
    UseContext {
        /// The context.
        name: String,
    },
    /// Add a fleet as context NAME from its admin.conf (a copy of its credentials; with --link, the
    /// file's path, read on each use). The first context becomes the current one.
    Import {
        /// The context: 1 to 63 of A-Z, a-z, 0-9, '.', '_', '-'.
        name: String,
        /// The fleet's admin.conf (DATA_DIR/admin.conf on its controller).
        admin_conf: PathBuf,
        /// Keep the path instead of a copy (follows the file when the controller rewrites it).
        #[arg(long)]
        link: bool,
        /// Replace a context of that name.
        #[arg(long)]
        force: bool,
    },
    /// Remove a context.
    #[command(alias = "remove-context")]
    DeleteContext {
        /// The context.
        name: String,
    },
}

/// Where a command's credentials come from.
#[derive(Debug)]
pub enum Source {
    /// An admin.conf file.
    File(PathBuf),
    /// A context of the config file.
    Context(String),
}

impl Source {
    /// `--context` (or SHOAL_CONTEXT) names a context; else `--config` (or SHOAL_CONFIG) a file;
    /// else the config file's current context. `--config` typed with `--context` is refused.
    pub fn choose(
        config: Option<PathBuf>,
        config_typed: bool,
        context: Option<String>,
    ) -> anyhow::Result<Source> {
        match (config, context) {
            (Some(_), Some(_)) if config_typed => {
                bail!("--config and --context both name credentials: pass one")
            }
            (_, Some(name)) => Ok(Source::Context(name)),
            (Some(path), None) => Ok(Source::File(path)),
            (None, None) => {
                let path = config_path()?;
                match ContextsFile::load(&path)?.current_context {
                    Some(name) => Ok(Source::Context(name)),
                    None => bail!(
                        "no admin credentials: pass --config DATA_DIR/admin.conf or set \
                         SHOAL_CONFIG, or add a context: shoalctl config import NAME \
                         DATA_DIR/admin.conf"
                    ),
                }
            }
        }
    }

    /// The credentials.
    pub fn admin_conf(&self) -> anyhow::Result<AdminConf> {
        match self {
            Source::File(path) => Ok(AdminConf::read(path)?),
            Source::Context(name) => {
                let path = config_path()?;
                let file = ContextsFile::load(&path)?;
                Ok(file
                    .get(name)
                    .with_context(|| format!("in {}", path.display()))?
                    .resolve(name)?)
            }
        }
    }
}

/// The shoalctl config file's path.
fn config_path() -> anyhow::Result<PathBuf> {
    default_path().context("neither XDG_CONFIG_HOME nor HOME is set: no shoalctl config file")
}

/// A context as `get-contexts` lists it.
#[derive(Debug, Serialize)]
struct ContextView {
    name: String,
    current: bool,
    api: Option<String>,
    source: String,
    error: Option<String>,
}

/// `shoalctl config …`. `context` is `--context`, which `current-context` reports when given.
pub fn config(cmd: ConfigCmd, context: Option<&str>, out: &Out) -> anyhow::Result<()> {
    let path = config_path()?;
    let mut file = ContextsFile::load(&path)?;
    match cmd {
        ConfigCmd::GetContexts => {
            let views: Vec<ContextView> = file
                .contexts
                .iter()
                .map(|(name, entry)| {
                    let resolved = entry.resolve(name);
                    ContextView {
                        name: name.clone(),
                        current: file.current_context.as_deref() == Some(name),
                        api: resolved.as_ref().ok().map(|c| c.api.clone()),
                        source: entry.source(),
                        error: resolved.err().map(|e| e.to_string()),
                    }
                })
                .collect();
            out.show(&views, || {
                out.table(
                    &["CURRENT", "NAME", "API", "FROM"],
                    views.iter().map(|v| {
                        vec![
                            if v.current { "*" } else { "" }.to_owned(),
                            v.name.clone(),
                            v.api
                                .clone()
                                .or_else(|| v.error.clone())
                                .unwrap_or_default(),
                            v.source.clone(),
                        ]
                    }),
                )
            })
        }
        ConfigCmd::CurrentContext => {
            let Some(name) = context.or(file.current_context.as_deref()) else {
                bail!("no current context in {}", path.display());
            };
            out.show(&serde_json::json!({ "current_context": name }), || {
                say!("{name}")
            })
        }
        ConfigCmd::UseContext { name } => {
            file.get(&name)
                .with_context(|| format!("in {}", path.display()))?;
            file.current_context = Some(name.clone());
            file.save(&path)?;
            out.show(&serde_json::json!({ "current_context": name }), || {
                say!("switched to context {name}")
            })
        }
        ConfigCmd::Import {
            name,
            admin_conf,
            link,
            force,
        } => {
            check_context_name(&name)?;
            if file.contexts.contains_key(&name) && !force {
                bail!("context {name} exists (--force replaces it)");
            }
            let conf = AdminConf::read(&admin_conf)?;
            let entry = if link {
                ContextEntry::linked(absolute(&admin_conf)?)
            } else {
                ContextEntry::inline(conf.clone())
            };
            file.contexts.insert(name.clone(), entry.clone());
            if file.current_context.is_none() {
                file.current_context = Some(name.clone());
            }
            file.save(&path)?;
            let view = ContextView {
                current: file.current_context.as_deref() == Some(name.as_str()),
                name: name.clone(),
                api: Some(conf.api.clone()),
                source: entry.source(),
                error: None,
            };
            out.show(&view, || {
                say!(
                    "added context {name} ({}){}",
                    conf.api,
                    if view.current { ", now current" } else { "" }
                )
            })
        }
        ConfigCmd::DeleteContext { name } => {
            file.get(&name)
                .with_context(|| format!("in {}", path.display()))?;
            file.contexts.remove(&name);
            if file.current_context.as_deref() == Some(name.as_str()) {
                file.current_context = None;
            }
            file.save(&path)?;
            out.show(&serde_json::json!({ "deleted": name }), || {
                say!("deleted context {name}")
            })
        }
    }
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("cannot resolve {}", p.display()))
}
