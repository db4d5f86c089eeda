//! The web view in a real headless browser: Debian's chromium driven through chromedriver
//! (WebDriver), on a host of its own on the fleet's LAN, against a real controller with three
//! agents.
//!
//! - a page without a session sends the browser to the login form; the admin token logs in;
//!   logging out ends the session;
//! - every page loads, and shows what `shoalctl … -o json` shows for the same fleet: node ids and
//!   statuses, drive states and SMART verdicts, overlay paths and their kinds, rollouts and their
//!   states, backup rows and their verification, events;
//! - a drive with a SMART history gets trend charts;
//! - screenshots of the overview and of a drive page are saved under the test's output dir
//!   (`target/tmp/web/`), and their paths printed.
//!
//! SMART: this machine's only disk is virtio (no SMART; the agent does not even ask smartctl), so
//! two agents are given a SATA disk `sdb`: each sees a small sysfs tree of its own as
//! `/sys/block` (a bind mount inside the mount namespace `ip netns exec` gives it) and runs a
//! stand-in `smartctl` that replays recorded smartctl JSON (`agent/tests/fixtures/smart/`): one a
//! healthy HDD whose reallocated sector count rises between reads (a `warning`), the other a
//! failing HDD. `/dev/sdb` does not exist, so the agent says the drive is `unreadable` (it cannot
//! look for signatures), which is what such a node would report. The third agent sees the real
//! `/sys/block` and reports the virtio disk: no SMART.
//!
//! Needs root, network namespaces, chromium and chromedriver (skips with a reason otherwise, fails
//! under CI).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use shoal_tests::testkit::{require, skip};
use shoal_tests::{eventually, require_host_tests, Fleet, FleetConfig, OrPanic, ProcSpec};

const TIMEOUT: Duration = Duration::from_secs(60);
const DRIVER_PORT: u16 = 9515;

/// A WebDriver session, used synchronously (the tests are synchronous; fantoccini is async).
struct Browser {
    rt: tokio::runtime::Runtime,
    client: Option<Client>,
    base: String,
}

impl Browser {
    fn client(&self) -> &Client {
        self.client.as_ref().expect("session open until drop")
    }

    fn goto(&self, path: &str) -> Result<()> {
        self.rt
            .block_on(self.client().goto(&format!("{}{path}", self.base)))
            .with_context(|| format!("loading {path}"))
    }

    /// The path of the page the browser shows.
    fn path(&self) -> Result<String> {
        Ok(self
            .rt
            .block_on(self.client().current_url())?
            .path()
            .to_owned())
    }

    fn texts(&self, css: &str) -> Result<Vec<String>> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            for e in self.client().find_all(Locator::Css(css)).await? {
                out.push(e.text().await?.trim().to_owned());
            }
            Ok(out)
        })
    }

    fn text(&self, css: &str) -> Result<String> {
        self.texts(css)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no {css} on {}", self.path().unwrap_or_default()))
    }

    fn attrs(&self, css: &str, attr: &str) -> Result<Vec<String>> {
        self.rt.block_on(async {
            let mut out = Vec::new();
            for e in self.client().find_all(Locator::Css(css)).await? {
                out.push(e.attr(attr).await?.unwrap_or_default());
            }
            Ok(out)
        })
    }

    fn count(&self, css: &str) -> Result<usize> {
        Ok(self
            .rt
            .block_on(self.client().find_all(Locator::Css(css)))?
            .len())
    }

    fn login(&self, token: &str) -> Result<()> {
        self.rt.block_on(async {
            let c = self.client();
            c.find(Locator::Css("input[name=token]"))
                .await?
                .send_keys(token)
                .await?;
            c.find(Locator::Css("button[type=submit]"))
                .await?
                .click()
                .await?;
            Ok(())
        })
    }

    fn click(&self, css: &str) -> Result<()> {
        self.rt.block_on(async {
            self.client().find(Locator::Css(css)).await?.click().await?;
            Ok(())
        })
    }

    /// A PNG of the viewport at `width`×`height`, written to `file`.
    fn screenshot(&self, width: u32, height: u32, file: &Path) -> Result<()> {
        let png = self.rt.block_on(async {
            self.client().set_window_size(width, height).await?;
            self.client().screenshot().await
        })?;
        std::fs::write(file, png).with_context(|| format!("writing {}", file.display()))?;
        let html = self.rt.block_on(self.client().source())?;
        std::fs::write(file.with_extension("html"), html)?;
        println!("screenshot: {} (page source beside it)", file.display());
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
    }
}

/// Opens a chromium session through the chromedriver listening on loopback in the calling
/// thread's namespace.
fn open_browser(base: &str, profile: &Path) -> Result<Browser> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    // The controller's certificate is signed by the fleet CA, which this profile does not trust
    // (an operator imports ca.crt; see the operators' guide).
    caps.insert("acceptInsecureCerts".into(), json!(true));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1440,1000", "--hide-scrollbars", "--force-device-scale-factor=1",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    let url = format!("http://127.0.0.1:{DRIVER_PORT}");
    let client = eventually!(
        Duration::from_secs(30),
        "chromedriver starts a session",
        || {
            rt.block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps.clone())
                    .connect(&url),
            )
            .map_err(|e| anyhow!("{e}"))
        }
    )?;
    Ok(Browser {
        rt,
        client: Some(client),
        base: base.to_owned(),
    })
}

/// The stand-in smartctl (see the module docs): each `-a` read prints the next recorded
/// `read-N.json` of `dir` (the last one again once they run out) and exits with `dir/exit`.
fn fake_smartctl(dir: &Path, reads: &[Value], exit: i32) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    for (i, r) in reads.iter().enumerate() {
        std::fs::write(dir.join(format!("read-{i}.json")), serde_json::to_vec(r)?)?;
    }
    let script = dir.join("smartctl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             # test stand-in for smartctl: replays recorded JSON, one file per read\n\
             d='{dir}'\n\
             case \" $* \" in *\" -t \"*) echo '{{}}'; exit 4;; esac\n\
             n=$(cat \"$d/count\" 2>/dev/null || echo 0)\n\
             echo $((n + 1)) > \"$d/count\"\n\
             i=$n; [ \"$i\" -ge {last} ] && i={last_index}\n\
             cat \"$d/read-$i.json\"\n\
             exit {exit}\n",
            dir = dir.display(),
            last = reads.len(),
            last_index = reads.len() - 1,
        ),
    )?;
    let mut perm = std::fs::metadata(&script)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&script, perm)?;
    Ok(script)
}

/// A SATA disk `sdb` as sysfs shows it, with `model` and `serial`, in `dir` (to be `/sys/block`);
/// and the agent wrapper that mounts it there before starting the agent.
fn fake_disk(dir: &Path, agent: &Path, model: &str, serial: &str) -> Result<PathBuf> {
    let sdb = dir.join("sys-block/sdb");
    for sub in ["device", "queue", "holders"] {
        std::fs::create_dir_all(sdb.join(sub))?;
    }
    for (file, value) in [
        ("size", "3907029168"),
        ("removable", "0"),
        ("ro", "0"),
        ("dev", "8:16"),
        ("queue/rotational", "1"),
        ("device/model", model),
        ("device/serial", serial),
    ] {
        std::fs::write(sdb.join(file), format!("{value}\n"))?;
    }
    let wrapper = dir.join("agent-with-sdb");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             # test rig: this agent sees a SATA disk; the mount stays in the mount namespace of\n\
             # `ip netns exec`\n\
             mount --bind '{sys}' /sys/block || exit 1\n\
             exec '{agent}' \"$@\"\n",
            sys = dir.join("sys-block").display(),
            agent = agent.display(),
        ),
    )?;
    let mut perm = std::fs::metadata(&wrapper)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&wrapper, perm)?;
    Ok(wrapper)
}

fn fixture(name: &str) -> Result<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/smart")
        .join(name);
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("{}", path.display()))?,
    )?)
}

/// The healthy HDD fixture at read `k`: its temperature moves, and its reallocated sector count
/// (ATA 5) rises from 0 to 8 at the fourth read.
fn healthy_reads() -> Result<Vec<Value>> {
    let base = fixture("ata-hdd-healthy.json")?;
    let temps = [31, 33, 36, 35, 38, 41, 39];
    let realloc = [0, 0, 0, 8, 8, 8, 8];
    let mut out = Vec::new();
    for (t, r) in temps.into_iter().zip(realloc) {
        let mut v = base.clone();
        v["temperature"]["current"] = json!(t);
        for a in v["ata_smart_attributes"]["table"]
            .as_array_mut()
            .context("attribute table")?
        {
            if a["id"] == 5 {
                a["raw"]["value"] = json!(r);
                a["raw"]["string"] = json!(r.to_string());
            }
        }
        out.push(v);
    }
    Ok(out)
}

/// The bearer token in `admin.conf` (`token = "…"`), as an operator would copy it.
fn admin_token(conf: &Path) -> Result<String> {
    let text = std::fs::read_to_string(conf)?;
    text.lines()
        .find_map(|l| l.strip_prefix("token = "))
        .map(|t| t.trim().trim_matches('"').to_owned())
        .with_context(|| format!("no token in {}", conf.display()))
}

fn as_vec(v: Value) -> Vec<Value> {
    v.as_array().cloned().unwrap_or_default()
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

#[test]
fn the_web_view_shows_what_shoalctl_shows() {
    require_host_tests!();
    require!(skip::tool("chromium", "chromium"));
    require!(skip::tool("chromedriver", "chromium-driver"));
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    let healthy_reads = healthy_reads().or_panic();
    let failing_read = fixture("ata-failing.json").or_panic();
    let mut cfg = FleetConfig::fast().agents(0);
    cfg.wait_up = false;
    let mut fleet = Fleet::start(cfg).or_panic();
    let agent = fleet.bins().agent.clone();
    let rig = |name: &str, reads: &[Value], exit: i32| -> Result<(PathBuf, PathBuf)> {
        let dir = w.join(name);
        let smartctl = fake_smartctl(&dir, reads, exit)?;
        let wrapper = fake_disk(
            &dir,
            &agent,
            &s(&reads[0]["model_name"]),
            &s(&reads[0]["serial_number"]),
        )?;
        Ok((smartctl, wrapper))
    };
    let healthy = rig("healthy", &healthy_reads, 0).or_panic();
    let failing = rig("failing", std::slice::from_ref(&failing_read), 216).or_panic();
    let token = fleet
        .create_token(&["--ttl", "1h", "--uses", "3", "--label", "pool=web"])
        .or_panic();
    for sata in [Some(&healthy), Some(&failing), None] {
        let mut args = vec!["--smart-interval".to_owned(), "1s".to_owned()];
        if let Some((smartctl, _)) = sata {
            args.extend(["--smartctl".to_owned(), smartctl.display().to_string()]);
        }
        fleet.config_mut().agent_args = args;
        fleet.config_mut().agent_program = sata.map(|(_, wrapper)| wrapper.clone());
        fleet.add_agent(&token).or_panic();
    }
    fleet.wait_all_up(TIMEOUT).or_panic();
    scenario(&mut fleet, w).or_panic();
}

fn scenario(fleet: &mut Fleet, w: &Path) -> Result<()> {
    let ids: Vec<String> = (0..3).map(|i| fleet.node_id(i)).collect::<Result<_>>()?;

    // Something in every section: a maintenance run waiting for a window that is closed now (it
    // opens on 1 January), and a backup job (with a local repository) on every node.
    fleet.ctl_ok(&[
        "window",
        "create",
        "new-year",
        "--schedule",
        "0 0 1 1 *",
        "--duration",
        "1m",
    ])?;
    fleet.ctl_ok(&[
        "maintenance",
        "run",
        "exec",
        "--selector",
        "pool=web",
        "--window",
        "new-year",
        "--",
        "/usr/bin/true",
    ])?;
    let pw = w.join("restic-password");
    std::fs::write(&pw, "correct horse battery staple\n")?;
    let repo = w.join("restic-repo");
    let data = w.join("backup-data");
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join("a.txt"), "hello")?;
    fleet.ctl_ok(&[
        "backup",
        "target",
        "add",
        "local",
        &repo.display().to_string(),
        "--password-file",
        &pw.display().to_string(),
    ])?;
    fleet.ctl_ok(&[
        "backup",
        "job",
        "create",
        "nightly",
        "--selector",
        "pool=web",
        "--path",
        &data.display().to_string(),
        "--schedule",
        "0 3 * * *",
        "--target",
        "local",
    ])?;

    // The fleet the pages will show: verdicts from the SMART history, and direct overlay paths.
    let drives = eventually!(TIMEOUT, "SMART verdicts of every node's disk", || {
        let d = as_vec(fleet.ctl_json(&["drives", "list"])?);
        let verdict = |node: &str| {
            d.iter()
                .find(|x| x["node"] == node && x["smart"]["status"] != "pending")
                .map(|x| (s(&x["smart"]["verdict"]), s(&x["smart"]["status"])))
        };
        let got = [verdict(&ids[0]), verdict(&ids[1]), verdict(&ids[2])];
        ensure!(
            got[0].as_ref().is_some_and(|v| v.0 == "warning")
                && got[1].as_ref().is_some_and(|v| v.0 == "failing")
                && got[2].as_ref().is_some_and(|v| v.1 == "no-smart"),
            "verdicts so far: {got:?}"
        );
        Ok(d)
    })?;
    let sick = drives
        .iter()
        .find(|d| d["node"] == ids[0].as_str())
        .context("agent 1's drive")?;
    let sick_device = s(&sick["device"]);
    eventually!(
        TIMEOUT,
        "direct overlay paths between the three nodes",
        || {
            let p = as_vec(fleet.ctl_json(&["overlay", "paths"])?);
            let direct = p.iter().filter(|p| p["kind"] == "direct").count();
            ensure!(direct >= 6, "{direct} direct paths: {p:?}");
            Ok(())
        }
    )?;

    // The browser: a host of its own on the LAN, like an operator's laptop.
    let browser_ns = {
        let lan = fleet.lan_name();
        let topo = fleet.topology_mut();
        topo.add_host("browser")?;
        topo.connect("browser", lan)?;
        topo.host("browser")?.ns_name().to_owned()
    };
    let _driver = ProcSpec::new("chromedriver", "chromedriver", fleet.dir().join("logs"))
        .netns(&browser_ns)
        .arg(format!("--port={DRIVER_PORT}"))
        .spawn()?;
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web");
    std::fs::create_dir_all(&out_dir)?;
    let token = admin_token(&fleet.admin_conf())?;
    let base = format!("https://{}", fleet.api_addr());
    let profile = w.join("chromium-profile");
    let fleet = &*fleet;
    shoal_tests::netns::enter(&browser_ns, || -> Result<()> {
        let b = open_browser(&base, &profile)?;
        browse(&b, fleet, &token, &ids, &sick_device, &out_dir)
    })?
}

fn browse(
    b: &Browser,
    fleet: &Fleet,
    token: &str,
    ids: &[String],
    sick_device: &str,
    out_dir: &Path,
) -> Result<()> {
    // 1. No session: the login form, whatever page was asked for.
    for path in ["/ui/", "/ui/nodes", "/ui/drives"] {
        b.goto(path)?;
        ensure!(b.path()? == "/ui/login", "{path} without a session");
    }
    // A click submits the form and returns; the next page loads after it.
    let loaded = Duration::from_secs(10);
    b.login("not-the-token")?;
    eventually!(loaded, "a wrong token is refused", || {
        ensure!(
            b.text(".error")?.contains("not the admin token"),
            "no refusal shown"
        );
        Ok(())
    })?;
    b.goto("/ui/nodes")?;
    b.login(token)?;
    eventually!(loaded, "logged in", || {
        ensure!(b.path()? == "/ui/", "on {}", b.path()?);
        Ok(())
    })?;

    // 2. Every page shows what shoalctl shows (read again until both agree: the fleet moves).
    let t = Duration::from_secs(30);
    eventually!(t, "the overview matches `shoalctl report`", || {
        let report = fleet.report()?;
        b.goto("/ui/")?;
        let count = |k: &str| report["by_status"][k].as_u64().unwrap_or(0).to_string();
        let drives = report["drives"]["attention"].as_array().map_or(0, Vec::len)
            + report["drives"]["missing"].as_array().map_or(0, Vec::len);
        let seen = (
            b.text("#stat-total .value")?,
            b.text("#stat-up .value")?,
            b.text("#stat-down .value")?,
            b.text("#stat-drives .value")?,
            b.text("#stat-rollouts .value")?,
        );
        let want = (
            report["total"].to_string(),
            count("up"),
            count("down"),
            drives.to_string(),
            "1".to_owned(),
        );
        ensure!(seen == want, "page {seen:?}, shoalctl {want:?}");
        let flagged: BTreeSet<String> = b
            .attrs("#drive-attention tr[data-device]", "data-node")?
            .into_iter()
            .collect();
        ensure!(
            flagged == BTreeSet::from([ids[0].clone(), ids[1].clone()]),
            "drives needing attention on {flagged:?}"
        );
        Ok(())
    })?;
    b.screenshot(1440, 1250, &out_dir.join("overview.png"))?;

    eventually!(t, "the nodes page matches `shoalctl nodes list`", || {
        let nodes = fleet.nodes()?;
        b.goto("/ui/nodes")?;
        let rows: BTreeSet<String> = b
            .attrs("#nodes tbody tr", "data-node")?
            .into_iter()
            .collect();
        let want: BTreeSet<String> = nodes.iter().map(|n| s(&n["id"])).collect();
        ensure!(rows == want, "rows {rows:?}, shoalctl {want:?}");
        for n in &nodes {
            let id = s(&n["id"]);
            let status = b.text(&format!("tr[data-node='{id}'] td.status"))?;
            ensure!(
                status == s(&n["status"]),
                "{id}: {status} vs {}",
                n["status"]
            );
            let name = b.text(&format!("tr[data-node='{id}'] td:first-child"))?;
            ensure!(name == s(&n["hostname"]), "{id}: {name}");
        }
        Ok(())
    })?;
    b.screenshot(1440, 700, &out_dir.join("nodes.png"))?;
    for id in ids {
        let n = fleet.ctl_json(&["nodes", "show", id])?;
        b.goto(&format!("/ui/nodes/{id}"))?;
        ensure!(
            b.attrs("h1#node", "data-node")? == [id.clone()],
            "{id}'s page"
        );
        ensure!(b.text("h1#node .status")? == s(&n["status"]));
        let devices = b.attrs("table.drives tr[data-device]", "data-device")?;
        ensure!(!devices.is_empty(), "{id}'s page lists its drives");
    }
    b.goto(&format!("/ui/nodes/{}", ids[0]))?;
    b.screenshot(1440, 1400, &out_dir.join("node.png"))?;

    eventually!(t, "the drives page matches `shoalctl drives list`", || {
        let drives = as_vec(fleet.ctl_json(&["drives", "list"])?);
        b.goto("/ui/drives")?;
        ensure!(
            b.count("table.drives tbody tr")? == drives.len(),
            "{} rows, {} drives",
            b.count("table.drives tbody tr")?,
            drives.len()
        );
        for d in &drives {
            let row = format!(
                "tr[data-node='{}'][data-device='{}']",
                s(&d["node"]),
                s(&d["device"])
            );
            let verdict = b.text(&format!("{row} td.verdict"))?;
            let state = b.text(&format!("{row} td.state"))?;
            ensure!(
                verdict == s(&d["smart"]["verdict"]) && state == s(&d["state"]),
                "{row}: page {verdict}/{state}, shoalctl {}/{}",
                d["smart"]["verdict"],
                d["state"]
            );
        }
        Ok(())
    })?;
    ensure!(
        b.count(&format!("tr[data-node='{}'] svg.spark", ids[0]))? == 1,
        "a temperature sparkline for the drive with a SMART history"
    );
    b.screenshot(1440, 600, &out_dir.join("drives.png"))?;

    b.goto(&format!("/ui/drives/{}/{sick_device}", ids[0]))?;
    ensure!(b.text("h1#drive .verdict")? == "warning");
    let charts = b.texts("#charts figcaption .chart-title")?;
    ensure!(
        charts.iter().any(|c| c == "Temperature")
            && charts.iter().any(|c| c.starts_with("reallocated sectors")),
        "charts: {charts:?}"
    );
    ensure!(b.count("#charts svg path.line")? >= 3, "lines drawn");
    b.screenshot(1440, 1000, &out_dir.join("drive.png"))?;

    eventually!(
        t,
        "the overlay page matches `shoalctl overlay paths`",
        || {
            let paths = as_vec(fleet.ctl_json(&["overlay", "paths"])?);
            b.goto("/ui/overlay")?;
            for p in &paths {
                let kind = b.text(&format!(
                    "#paths tr[data-from='{}'][data-to='{}'] td.kind",
                    s(&p["from"]),
                    s(&p["to"])
                ))?;
                ensure!(kind == s(&p["kind"]), "{p}: {kind}");
            }
            ensure!(b.count("#paths tbody tr")? == paths.len());
            Ok(())
        }
    )?;
    b.screenshot(1440, 900, &out_dir.join("overlay.png"))?;

    eventually!(
        t,
        "the rollouts page matches `shoalctl maintenance list`",
        || {
            let rollouts = as_vec(fleet.ctl_json(&["maintenance", "list"])?);
            b.goto("/ui/rollouts")?;
            ensure!(!rollouts.is_empty());
            for r in &rollouts {
                let id = s(&r["id"]);
                let state = b.text(&format!("div[data-rollout='{id}'] .state"))?;
                ensure!(state == s(&r["state"]), "{id}: {state} vs {}", r["state"]);
                let nodes = b.count(&format!("div[data-rollout='{id}'] tr[data-node]"))?;
                ensure!(nodes == r["nodes"].as_array().map_or(0, Vec::len));
            }
            Ok(())
        }
    )?;
    b.screenshot(1440, 600, &out_dir.join("rollouts.png"))?;

    eventually!(t, "the backups page matches `shoalctl backup list`", || {
        let rows = as_vec(fleet.ctl_json(&["backup", "list"])?);
        b.goto("/ui/backups")?;
        ensure!(rows.len() == 3, "one row per node: {rows:?}");
        ensure!(b.count("#backups tbody tr")? == rows.len());
        for r in &rows {
            let v = b.text(&format!(
                "#backups tr[data-job='{}'][data-node='{}'] td.verification",
                s(&r["job"]),
                s(&r["node"])
            ))?;
            ensure!(v == s(&r["verification"]), "{r}: {v}");
        }
        Ok(())
    })?;
    b.screenshot(1440, 600, &out_dir.join("backups.png"))?;

    eventually!(t, "the events page shows the newest events", || {
        let events = fleet.events()?;
        b.goto("/ui/events")?;
        let shown: BTreeSet<u64> = b
            .attrs("#events tr[data-seq]", "data-seq")?
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        let newest = *shown.iter().next_back().context("no events shown")?;
        for e in events.iter().rev().take(50) {
            let seq = e["seq"].as_u64().unwrap_or(0);
            if seq <= newest {
                ensure!(shown.contains(&seq), "event {seq} missing: {e}");
            }
        }
        Ok(())
    })?;

    // 3. Logging out ends the session.
    b.goto("/ui/")?;
    b.click("header form button")?;
    eventually!(
        Duration::from_secs(10),
        "logging out lands on the login page",
        || {
            ensure!(b.path()? == "/ui/login", "on {}", b.path()?);
            Ok(())
        }
    )?;
    b.goto("/ui/events")?;
    ensure!(b.path()? == "/ui/login", "logged out");
    Ok(())
}
