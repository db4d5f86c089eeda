//! `shoal-controller migrate`: a stopped controller's sled store into etcd.

use std::path::PathBuf;

use anyhow::Context;
use shoal_controller::dr::migrate::migrate_to_etcd;

use crate::etcd::EtcdArgs;

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The data directory of the stopped controller whose store is copied.
    #[arg(long)]
    data_dir: PathBuf,
    #[command(flatten)]
    etcd: EtcdArgs,
}

pub fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let Some(config) = args.etcd.config()? else {
        anyhow::bail!("--etcd-endpoints is required");
    };
    let report = migrate_to_etcd(&args.data_dir, &config).with_context(|| {
        format!(
            "migrating the store of {} to etcd at {} under {}",
            args.data_dir.display(),
            config.endpoints_text(),
            config.prefix
        )
    })?;
    for t in &report.tables {
        println!(
            "{:<24} {:>8} entries  sha256 {}",
            t.name, t.entries, t.sha256
        );
    }
    println!(
        "moved {} tables, {} entries from {} to etcd at {} under {}, verified; start the controllers with \
         --etcd-endpoints {} --etcd-prefix {} (the data dir keeps the CA and admin credential: copy it to each)",
        report.tables.len(),
        report.entries(),
        args.data_dir.display(),
        config.endpoints_text(),
        config.prefix,
        config.endpoints_text(),
        config.prefix
    );
    Ok(())
}
