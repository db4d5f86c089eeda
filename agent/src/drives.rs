//! The agent's drive manager: which drives the machine has, what they hold, their SMART, and what
//! the node's policy says to do with a new one.
//!
//! [`DriveBook`] is the sans-IO core: facts come in (a device appeared or vanished, what probing
//! found on it, a SMART read, the controller's policy and commands, a preparation's outcome), and
//! it answers with [`Work`] for the shell to do (examine a device, read SMART, prepare, detach a
//! vanished mount, start a self-test, answer a command). Time is passed in. The shell, [`run`],
//! does the I/O: sysfs scans ([`crate::blockdev::scan`]), kernel uevents, smartctl, `prepare`.
//!
//! Architecture Invariant: the only path to writing a drive is [`Work::Prepare`], and the book
//! emits it only for a drive whose examination found it blank (policy `prepare` or an operator's
//! command), or for an operator's command that carries a serial number (`--force`), which `prepare`
//! checks again against the drive itself before writing anything.

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::daemon::now_ms;
use tracing::{debug, info, warn};

use shoal_proto::{
    Drive, DriveAction, DriveCommand, DriveCommandResult, DrivePolicy, DrivePolicyMode,
    DriveReport, DriveState, Filesystem, PreparedDrive, SelfTestKind, SelfTestStatus, SmartOutcome,
    SmartReport, UnixMillis,
};

/// How often the drive manager reads SMART, and how it paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriveTiming {
    /// SMART read interval per drive. Default 30 min: the predictors move over days; smartctl -a
    /// wakes a sleeping HDD on some models, so not too often.
    pub smart_interval: Duration,
    /// SMART read interval while a self-test runs, to report its end promptly. Default 30 s.
    pub self_test_poll: Duration,
}

impl Default for DriveTiming {
    fn default() -> Self {
        Self {
            smart_interval: Duration::from_secs(30 * 60),
            self_test_poll: Duration::from_secs(30),
        }
    }
}

/// What the agent knows about a block device without reading its contents (from sysfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFacts {
    /// Kernel name (`sdb`).
    pub name: String,
    /// Model.
    pub model: Option<String>,
    /// Serial number (sysfs; for loop devices the backing file).
    pub serial: Option<String>,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Removable media.
    pub removable: bool,
}

impl DeviceFacts {
    /// The drive as the controller is told about it.
    fn drive(&self, state: DriveState, smart: Option<&(SmartOutcome, UnixMillis)>) -> Drive {
        Drive {
            name: self.name.clone(),
            model: self.model.clone(),
            serial: self.serial.clone(),
            size_bytes: self.size_bytes,
            removable: self.removable,
            state,
            smart: smart.map(|(o, _)| o.clone()),
            smart_at: smart.map(|(_, at)| *at),
        }
    }
}

/// What examining a device found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Examined {
    /// A drive shoal prepared earlier; it is mounted now.
    Prepared(PreparedDrive),
    /// Nothing on it: blank.
    Blank,
    /// Signatures found on it.
    HasData(Vec<String>),
    /// Its first and last blocks could not be read.
    Unreadable(String),
}

/// Work the shell does for the book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// Restore-or-probe the device: mount it if it is a shoal drive, else read what is on it.
    Examine(String),
    /// Run smartctl on the device.
    ReadSmart(String),
    /// Partition, format and mount the device. `id` is the controller command's, `None` for the
    /// policy.
    Prepare {
        /// Device name.
        device: String,
        /// The drive's serial number as sysfs reports it.
        serial: Option<String>,
        /// The filesystem.
        filesystem: Filesystem,
        /// The operator's `--force --serial`.
        force_serial: Option<String>,
        /// The command being answered, if any.
        command: Option<u64>,
    },
    /// Lazily unmount a prepared drive that vanished, and remove its mount point.
    Detach(PreparedDrive),
    /// Start a SMART self-test.
    SelfTest {
        /// Device name.
        device: String,
        /// Its kind.
        kind: SelfTestKind,
        /// The command being answered.
        command: u64,
    },
    /// Answer a controller command.
    Answer(DriveCommandResult),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Contents {
    /// Examination pending.
    Unknown,
    Known(Examined),
    Preparing,
    PrepareFailed(String),
}

#[derive(Debug)]
struct Entry {
    facts: DeviceFacts,
    contents: Contents,
    smart: Option<(SmartOutcome, UnixMillis)>,
    /// A SMART read is out; don't start another.
    smart_pending: bool,
    next_smart: Instant,
    /// A self-test was started by us: poll faster until the drive says it is no longer running.
    self_test_watch: bool,
}

/// The sans-IO drive manager.
#[derive(Debug)]
pub struct DriveBook {
    timing: DriveTiming,
    policy: DrivePolicy,
    drives: BTreeMap<String, Entry>,
    /// Prepared drives that vanished, by filesystem UUID: reported as `missing` until they come
    /// back.
    missing: BTreeMap<String, (DeviceFacts, PreparedDrive)>,
    work: VecDeque<Work>,
    changed: bool,
}

impl DriveBook {
    /// An empty book with a policy (the cached one, or the default `report`).
    pub fn new(timing: DriveTiming, policy: DrivePolicy) -> Self {
        Self {
            timing,
            policy,
            drives: BTreeMap::new(),
            missing: BTreeMap::new(),
            work: VecDeque::new(),
            changed: true,
        }
    }

    /// The policy in force.
    pub fn policy(&self) -> DrivePolicy {
        self.policy
    }

    /// A full scan: devices present now. Devices not in it vanished.
    pub fn scanned(&mut self, now: Instant, devices: Vec<DeviceFacts>) {
        let present: Vec<String> = devices.iter().map(|d| d.name.clone()).collect();
        let gone: Vec<String> = self
            .drives
            .keys()
            .filter(|n| !present.contains(n))
            .cloned()
            .collect();
        for name in gone {
            self.vanished(&name);
        }
        for facts in devices {
            self.appeared(now, facts);
        }
    }

    /// A device is present (uevent `add`/`change`, or found by a scan).
    pub fn appeared(&mut self, now: Instant, facts: DeviceFacts) {
        // Same medium as before: keep what we know. A different one under the same name (size or
        // serial changed, e.g. a card swapped in a reader) is examined afresh, and a prepared one
        // it replaced is missing.
        match self.drives.get(&facts.name) {
            Some(entry) if entry.facts == facts => return,
            Some(_) => self.vanished(&facts.name),
            None => {}
        }
        let name = facts.name.clone();
        let mut entry = Entry::new(facts, now);
        entry.smart_pending = true;
        self.drives.insert(name.clone(), entry);
        self.work.push_back(Work::Examine(name.clone()));
        self.work.push_back(Work::ReadSmart(name));
        self.changed = true;
    }

    /// A device is gone (uevent `remove`, or absent from a scan). A prepared one becomes `missing`
    /// and its mount is detached.
    pub fn vanished(&mut self, name: &str) {
        let Some(entry) = self.drives.remove(name) else {
            return;
        };
        if let Contents::Known(Examined::Prepared(p)) = &entry.contents {
            self.missing
                .insert(p.fs_uuid.clone(), (entry.facts.clone(), p.clone()));
            self.work.push_back(Work::Detach(p.clone()));
        }
        self.changed = true;
    }

    /// What examining a device found.
    pub fn examined(&mut self, name: &str, result: Examined) {
        let Some(entry) = self.drives.get_mut(name) else {
            return;
        };
        if matches!(entry.contents, Contents::Preparing) {
            return;
        }
        if let Examined::Prepared(p) = &result {
            self.missing.remove(&p.fs_uuid);
        }
        entry.contents = Contents::Known(result);
        self.changed = true;
        self.consider_policy(name);
    }

    /// A SMART read finished.
    pub fn smart_read(&mut self, now: Instant, at: UnixMillis, name: &str, outcome: SmartOutcome) {
        let Some(entry) = self.drives.get_mut(name) else {
            return;
        };
        let running = matches!(
            &outcome,
            SmartOutcome::Report(SmartReport {
                self_test: Some(SelfTestStatus::Running { .. }),
                ..
            })
        );
        if entry.self_test_watch && !running {
            entry.self_test_watch = false;
        }
        let poll = if entry.self_test_watch || running {
            self.timing.self_test_poll
        } else {
            self.timing.smart_interval
        };
        entry.next_smart = now + poll;
        entry.smart_pending = false;
        entry.smart = Some((outcome, at));
        self.changed = true;
        self.consider_policy(name);
    }

    /// The controller's policy for this node.
    pub fn set_policy(&mut self, policy: DrivePolicy) {
        if policy == self.policy {
            return;
        }
        self.policy = policy;
        self.changed = true;
        let names: Vec<String> = self.drives.keys().cloned().collect();
        for name in names {
            self.consider_policy(&name);
        }
    }

    /// A command from the controller.
    pub fn command(&mut self, now: Instant, cmd: DriveCommand) {
        let answer = |result: Result<String, String>| {
            Work::Answer(DriveCommandResult { id: cmd.id, result })
        };
        let Some(entry) = self.drives.get_mut(&cmd.device) else {
            self.work
                .push_back(answer(Err(format!("no drive {} on this node", cmd.device))));
            return;
        };
        match cmd.action {
            DriveAction::SelfTest(kind) => {
                entry.self_test_watch = true;
                entry.next_smart = now + self.timing.self_test_poll;
                self.work.push_back(Work::SelfTest {
                    device: cmd.device,
                    kind,
                    command: cmd.id,
                });
            }
            DriveAction::Prepare {
                force_serial,
                filesystem,
            } => {
                let refusal = match &entry.contents {
                    Contents::Unknown => Some("the drive is still being examined; try again in a moment".to_owned()),
                    Contents::Preparing => Some("the drive is being prepared already".to_owned()),
                    Contents::Known(Examined::Prepared(p)) => {
                        Some(format!("the drive is prepared already and mounted at {}", p.mount_point))
                    }
                    Contents::Known(Examined::Unreadable(why)) => {
                        Some(format!("the drive cannot be read ({why}), so shoal cannot tell whether it holds data"))
                    }
                    Contents::Known(Examined::HasData(sigs)) if force_serial.is_none() => Some(format!(
                        "the drive holds data ({}): it is only written with --force and its serial number",
                        sigs.join(", ")
                    )),
                    _ => None,
                }
                .or_else(|| smart_failure(entry).map(|why| format!("SMART says the drive is failing ({why})")));
                if let Some(why) = refusal {
                    self.work.push_back(answer(Err(why)));
                    return;
                }
                entry.contents = Contents::Preparing;
                self.changed = true;
                self.work.push_back(Work::Prepare {
                    device: cmd.device,
                    serial: entry.facts.serial.clone(),
                    filesystem: filesystem.unwrap_or(self.policy.filesystem),
                    force_serial,
                    command: Some(cmd.id),
                });
            }
        }
    }

    /// A preparation ended.
    pub fn prepared(
        &mut self,
        name: &str,
        command: Option<u64>,
        result: Result<PreparedDrive, String>,
    ) {
        if let Some(id) = command {
            let answer = match &result {
                Ok(p) => Ok(format!("{name} prepared: {p}")),
                Err(e) => Err(format!("preparing {name} failed: {e}")),
            };
            self.work
                .push_back(Work::Answer(DriveCommandResult { id, result: answer }));
        }
        let Some(entry) = self.drives.get_mut(name) else {
            // Vanished while being prepared: if it got as far as a mount, that mount must go.
            if let Ok(p) = result {
                self.work.push_back(Work::Detach(p));
            }
            return;
        };
        entry.contents = match result {
            Ok(p) => Contents::Known(Examined::Prepared(p)),
            Err(e) => Contents::PrepareFailed(e),
        };
        self.changed = true;
    }

    /// A self-test start ended (the test itself runs on in the drive).
    pub fn self_test_started(&mut self, name: &str, command: u64, result: Result<String, String>) {
        if result.is_err() {
            if let Some(entry) = self.drives.get_mut(name) {
                entry.self_test_watch = false;
            }
        }
        self.work.push_back(Work::Answer(DriveCommandResult {
            id: command,
            result,
        }));
    }

    /// Applies the policy to one drive: prepare a blank drive whose SMART is known and not failing,
    /// or mark it awaiting approval.
    fn consider_policy(&mut self, name: &str) {
        let Some(entry) = self.drives.get_mut(name) else {
            return;
        };
        if !matches!(entry.contents, Contents::Known(Examined::Blank))
            || self.policy.mode != DrivePolicyMode::Prepare
        {
            return;
        }
        // Wait for the first SMART read: a failing drive is never prepared.
        if entry.smart.is_none() || smart_failure(entry).is_some() {
            return;
        }
        entry.contents = Contents::Preparing;
        self.changed = true;
        self.work.push_back(Work::Prepare {
            device: name.to_owned(),
            serial: entry.facts.serial.clone(),
            filesystem: self.policy.filesystem,
            force_serial: None,
            command: None,
        });
    }

    /// SMART reads that are due.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (name, entry) in &mut self.drives {
            if !entry.smart_pending && entry.next_smart <= now {
                entry.smart_pending = true;
                self.work.push_back(Work::ReadSmart(name.clone()));
            }
        }
    }

    /// When [`DriveBook::handle_timeout`] has something to do next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.drives
            .values()
            .filter(|e| !e.smart_pending)
            .map(|e| e.next_smart)
            .min()
    }

    /// The next piece of work.
    pub fn poll_work(&mut self) -> Option<Work> {
        self.work.pop_front()
    }

    /// Whether the report changed since the last call; clears the flag.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// The whole picture, for the controller.
    pub fn report(&self, at: UnixMillis) -> DriveReport {
        let present = self
            .drives
            .values()
            .map(|e| e.facts.drive(self.state_of(e), e.smart.as_ref()));
        let missing = self
            .missing
            .values()
            .map(|(facts, p)| facts.drive(DriveState::Missing(p.clone()), None));
        DriveReport {
            at,
            drives: present.chain(missing).collect(),
        }
    }

    fn state_of(&self, e: &Entry) -> DriveState {
        match &e.contents {
            // Not examined yet: say nothing about contents that could be read as "blank".
            Contents::Unknown => DriveState::Unreadable {
                reason: "not examined yet".into(),
            },
            Contents::Preparing => DriveState::Preparing,
            Contents::PrepareFailed(reason) => DriveState::PrepareFailed {
                reason: reason.clone(),
            },
            Contents::Known(Examined::Blank) if self.policy.mode == DrivePolicyMode::Approve => {
                DriveState::AwaitingApproval
            }
            Contents::Known(Examined::Blank) => DriveState::Blank,
            Contents::Known(Examined::HasData(s)) => DriveState::HasData {
                signatures: s.clone(),
            },
            Contents::Known(Examined::Prepared(p)) => DriveState::Prepared(p.clone()),
            Contents::Known(Examined::Unreadable(reason)) => DriveState::Unreadable {
                reason: reason.clone(),
            },
        }
    }
}

impl Entry {
    fn new(facts: DeviceFacts, now: Instant) -> Self {
        Self {
            facts,
            contents: Contents::Unknown,
            smart: None,
            smart_pending: false,
            next_smart: now,
            self_test_watch: false,
        }
    }
}

/// Why the drive's latest SMART says it is failing, judged on that one report with the same rules
/// the controller's verdict starts from (`SmartReport::health_failed`, `critical_warning`,
/// `spare_below_threshold`). The controller adds trends over the drive's history on top.
fn smart_failure(entry: &Entry) -> Option<String> {
    let Some((SmartOutcome::Report(r), _)) = &entry.smart else {
        return None;
    };
    if r.health_failed() {
        return Some("overall health self-assessment FAILED".into());
    }
    if let Some(bits) = r.critical_warning() {
        return Some(format!("NVMe critical warning 0x{bits:02x}"));
    }
    r.spare_below_threshold(shoal_proto::DEFAULT_SPARE_THRESHOLD_PERCENT)
        .map(|(spare, threshold)| format!("available spare {spare}% below threshold {threshold}%"))
}

/// How the drive manager runs. Every field has a documented default.
#[derive(Debug, Clone)]
pub struct DrivesConfig {
    /// Which block devices are drives (default: physical disks; `--drive-match` adds names).
    pub matcher: crate::blockdev::DriveMatch,
    /// Where prepared drives are mounted, and the devices and sysfs paths (see `PrepareConfig`).
    pub prepare: crate::prepare::PrepareConfig,
    /// How smartctl is run (default `smartctl` on PATH, 30 s deadline).
    pub smart: crate::smart::SmartConfig,
    /// SMART schedule.
    pub timing: DriveTiming,
    /// A full rescan of /sys/block this often, besides uevents (default 60 s): a safety net for
    /// lost events, and the only source of changes where the uevent socket cannot be opened.
    pub rescan_interval: Duration,
    /// The cached drive policy, kept across restarts so that policy `prepare` works while the
    /// controller is unreachable (default `<state dir>/drive-policy.json`, set by the daemon).
    pub policy_cache: Option<PathBuf>,
}

impl Default for DrivesConfig {
    fn default() -> Self {
        Self {
            matcher: crate::blockdev::DriveMatch::default(),
            prepare: crate::prepare::PrepareConfig::default(),
            smart: crate::smart::SmartConfig::default(),
            timing: DriveTiming::default(),
            rescan_interval: Duration::from_secs(60),
            policy_cache: None,
        }
    }
}

/// What the control session hands the drive manager.
#[derive(Debug)]
pub enum DriveInput {
    /// The controller's policy for this node.
    Policy(DrivePolicy),
    /// A command.
    Command(DriveCommand),
}

/// What the drive manager hands the control session.
#[derive(Debug)]
pub enum DriveEvent {
    /// The drives changed: the whole picture.
    Report(DriveReport),
    /// A command ended.
    Answer(DriveCommandResult),
}

/// Work that finished on another thread.
enum Done {
    Examined(String, Examined),
    Smart(String, SmartOutcome),
    Prepared(String, Option<u64>, Result<PreparedDrive, String>),
    SelfTest(String, u64, Result<String, String>),
}

fn load_policy(path: Option<&Path>) -> DrivePolicy {
    let Some(path) = path else {
        return DrivePolicy::default();
    };
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            warn!(path = %path.display(), cause = %e, "cached drive policy unreadable; using report");
            DrivePolicy::default()
        }),
        Err(_) => DrivePolicy::default(),
    }
}

fn save_policy(path: Option<&Path>, policy: &DrivePolicy) {
    let Some(path) = path else { return };
    let result = serde_json::to_vec(policy)
        .map_err(std::io::Error::other)
        .and_then(|bytes| shoal_overlay::pki::write_private_file(path, &bytes, 0o600));
    if let Err(e) = result {
        warn!(path = %path.display(), cause = %e, "could not cache the drive policy");
    }
}

/// Examines one device: a shoal drive is mounted (restored), anything else is probed for
/// signatures.
fn examine(config: &crate::prepare::PrepareConfig, name: &str) -> Examined {
    match crate::prepare::restore(config, &[name.to_owned()])
        .into_iter()
        .next()
    {
        Some(Ok(p)) => return Examined::Prepared(p),
        // A half-prepared drive (a shoal partition without a filesystem) or one that will not
        // mount: what is on it decides, so the operator can still re-prepare it with --force and
        // its serial.
        Some(Err(e)) => warn!(device = %name, cause = %e, "not restored as a shoal drive"),
        None => {}
    }
    match crate::prepare::probe(&config.dev_dir, name) {
        Ok(signatures) if signatures.is_empty() => Examined::Blank,
        Ok(signatures) => Examined::HasData(signatures.iter().map(ToString::to_string).collect()),
        Err(e) => Examined::Unreadable(e.to_string()),
    }
}

fn facts(dev: crate::blockdev::BlockDevice) -> DeviceFacts {
    DeviceFacts {
        name: dev.name,
        model: dev.model,
        serial: dev.serial,
        size_bytes: dev.size_bytes,
        removable: dev.removable,
    }
}

/// Runs the drive manager until `inputs` closes: watches uevents and rescans, examines, reads
/// SMART, applies the policy, carries out commands; tells `events` about every change.
pub async fn run(
    config: DrivesConfig,
    mut inputs: mpsc::UnboundedReceiver<DriveInput>,
    events: mpsc::UnboundedSender<DriveEvent>,
) {
    let sys_block = config.prepare.sys_block.clone();
    let mut book = DriveBook::new(config.timing, load_policy(config.policy_cache.as_deref()));
    let uevents = match crate::blockdev::UeventSocket::bind() {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(cause = %e, every = ?config.rescan_interval, "no kernel uevents; drives are found by rescanning only");
            None
        }
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let scan = |book: &mut DriveBook| {
        let devices = crate::blockdev::scan(&sys_block, &config.matcher)
            .into_iter()
            .map(facts)
            .collect();
        book.scanned(Instant::now(), devices);
    };
    scan(&mut book);
    let mut next_rescan = Instant::now() + config.rescan_interval;
    loop {
        while let Some(work) = book.poll_work() {
            let done = done_tx.clone();
            match work {
                Work::Examine(name) => {
                    let cfg = config.prepare.clone();
                    tokio::task::spawn_blocking(move || {
                        let found = examine(&cfg, &name);
                        debug!(device = %name, ?found, "examined");
                        let _ = done.send(Done::Examined(name, found));
                    });
                }
                Work::ReadSmart(name) => {
                    let smart = config.smart.clone();
                    tokio::spawn(async move {
                        let outcome = match crate::smart::smart_target(&name) {
                            Ok(path) => crate::smart::read_smart(&smart, &path).await,
                            Err(reason) => SmartOutcome::NoSmart { reason },
                        };
                        let _ = done.send(Done::Smart(name, outcome));
                    });
                }
                Work::Prepare {
                    device,
                    serial,
                    filesystem,
                    force_serial,
                    command,
                } => {
                    info!(device = %device, %filesystem, forced = force_serial.is_some(), "preparing drive");
                    let cfg = config.prepare.clone();
                    tokio::task::spawn_blocking(move || {
                        let result = crate::prepare::prepare(
                            &cfg,
                            &device,
                            serial.as_deref(),
                            filesystem,
                            force_serial.as_deref(),
                            &mut |step| debug!(device = %device, ?step, "prepare step"),
                        )
                        .map_err(|e| e.to_string());
                        match &result {
                            Ok(p) => {
                                info!(device = %device, mount = %p.mount_point, uuid = %p.fs_uuid, "drive prepared")
                            }
                            Err(e) => {
                                warn!(device = %device, cause = %e, "preparing the drive failed")
                            }
                        }
                        let _ = done.send(Done::Prepared(device, command, result));
                    });
                }
                Work::Detach(p) => {
                    warn!(mount = %p.mount_point, uuid = %p.fs_uuid, "a prepared drive vanished; detaching its mount");
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = crate::prepare::detach(&p) {
                            warn!(mount = %p.mount_point, cause = %e, "could not detach the mount of a vanished drive");
                        }
                    });
                }
                Work::SelfTest {
                    device,
                    kind,
                    command,
                } => {
                    let smart = config.smart.clone();
                    tokio::spawn(async move {
                        let result = match crate::smart::smart_target(&device) {
                            Ok(path) => crate::smart::start_self_test(&smart, &path, kind).await,
                            Err(reason) => Err(reason),
                        };
                        let _ = done.send(Done::SelfTest(device, command, result));
                    });
                }
                Work::Answer(answer) => {
                    let _ = events.send(DriveEvent::Answer(answer));
                }
            }
        }
        if book.take_changed() {
            let _ = events.send(DriveEvent::Report(book.report(now_ms())));
        }
        let wake = book
            .poll_timeout()
            .map_or(next_rescan, |t| t.min(next_rescan));
        tokio::select! {
            event = async {
                match &uevents {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            } => match event {
                Ok(ev) => {
                    if let Some(name) = ev.block_disk() {
                        match ev.action {
                            crate::blockdev::UeventAction::Remove => book.vanished(name),
                            _ => match crate::blockdev::read_block_device(&sys_block, name) {
                                Some(dev) if config.matcher.admits(&dev.name, dev.size_bytes) => {
                                    book.appeared(Instant::now(), facts(dev));
                                }
                                _ => book.vanished(name),
                            },
                        }
                    }
                }
                Err(crate::blockdev::UeventRecvError::Overrun) => {
                    warn!("kernel uevents were lost; rescanning drives");
                    scan(&mut book);
                }
                Err(e) => {
                    warn!(cause = %e, "uevent socket failed; rescanning");
                    scan(&mut book);
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            Some(done) = done_rx.recv() => match done {
                Done::Examined(name, found) => book.examined(&name, found),
                Done::Smart(name, outcome) => book.smart_read(Instant::now(), now_ms(), &name, outcome),
                Done::Prepared(name, command, result) => book.prepared(&name, command, result),
                Done::SelfTest(name, command, result) => book.self_test_started(&name, command, result),
            },
            input = inputs.recv() => match input {
                Some(DriveInput::Policy(policy)) => {
                    if policy != book.policy() {
                        info!(mode = %policy.mode, filesystem = %policy.filesystem, "drive policy");
                        save_policy(config.policy_cache.as_deref(), &policy);
                    }
                    book.set_policy(policy);
                }
                Some(DriveInput::Command(cmd)) => {
                    info!(id = cmd.id, device = %cmd.device, action = ?cmd.action, "drive command");
                    book.command(Instant::now(), cmd);
                }
                None => return,
            },
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                let now = Instant::now();
                if now >= next_rescan {
                    scan(&mut book);
                    next_rescan = now + config.rescan_interval;
                }
                book.handle_timeout(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_proto::{DriveProtocol, NvmePredictors, SmartExitStatus, SmartPredictors};

    fn facts(name: &str) -> DeviceFacts {
        DeviceFacts {
            name: name.into(),
            model: None,
            serial: Some(format!("SER-{name}")),
            size_bytes: 1 << 30,
            removable: false,
        }
    }

    fn nvme_report(critical: u8) -> SmartOutcome {
        SmartOutcome::Report(SmartReport {
            device: "/dev/nvme0".into(),
            protocol: DriveProtocol::Nvme,
            model: None,
            serial: None,
            firmware: None,
            capacity_bytes: None,
            temperature_celsius: None,
            power_on_hours: None,
            health_passed: Some(critical == 0),
            exit_status: SmartExitStatus(if critical == 0 { 0 } else { 8 }),
            predictors: SmartPredictors::Nvme(NvmePredictors {
                critical_warning: Some(critical),
                ..Default::default()
            }),
            self_test: None,
        })
    }

    fn prepared(name: &str) -> PreparedDrive {
        PreparedDrive {
            partition: format!("{name}1"),
            filesystem: Filesystem::Ext4,
            fs_uuid: format!("uuid-{name}"),
            label: "shoal-x".into(),
            mount_point: format!("/var/lib/shoal/drives/uuid-{name}"),
        }
    }

    fn drain(book: &mut DriveBook) -> Vec<Work> {
        std::iter::from_fn(|| book.poll_work()).collect()
    }

    fn policy(mode: DrivePolicyMode) -> DrivePolicy {
        DrivePolicy {
            mode,
            filesystem: Filesystem::Ext4,
        }
    }

    fn state(book: &DriveBook, name: &str) -> String {
        let r = book.report(UnixMillis(0));
        r.drives
            .iter()
            .find(|d| d.name == name)
            .map(|d| d.state.as_str().to_owned())
            .unwrap_or_default()
    }

    #[test]
    fn a_new_drive_is_examined_and_read_and_the_report_policy_leaves_it_alone() {
        let t0 = Instant::now();
        let mut book = DriveBook::new(DriveTiming::default(), DrivePolicy::default());
        book.appeared(t0, facts("sdb"));
        assert_eq!(
            drain(&mut book),
            vec![Work::Examine("sdb".into()), Work::ReadSmart("sdb".into())]
        );
        assert_eq!(
            state(&book, "sdb"),
            "unreadable",
            "unexamined is never reported blank"
        );
        book.examined("sdb", Examined::Blank);
        book.smart_read(t0, UnixMillis(1), "sdb", nvme_report(0));
        assert_eq!(drain(&mut book), vec![]);
        assert_eq!(state(&book, "sdb"), "blank");
        assert!(book.take_changed());
        assert!(!book.take_changed());
    }

    #[test]
    fn the_prepare_policy_prepares_a_blank_drive_only_after_smart_and_never_a_failing_one() {
        let t0 = Instant::now();
        let mut book = DriveBook::new(DriveTiming::default(), policy(DrivePolicyMode::Prepare));
        book.appeared(t0, facts("sdb"));
        book.appeared(t0, facts("sdc"));
        drain(&mut book);
        book.examined("sdb", Examined::Blank);
        assert_eq!(drain(&mut book), vec![], "waits for SMART");
        book.smart_read(t0, UnixMillis(1), "sdb", nvme_report(0));
        assert!(
            matches!(&drain(&mut book)[..], [Work::Prepare { device, command: None, force_serial: None, .. }] if device == "sdb")
        );
        assert_eq!(state(&book, "sdb"), "preparing");

        book.examined("sdc", Examined::Blank);
        book.smart_read(t0, UnixMillis(1), "sdc", nvme_report(0x04));
        assert_eq!(drain(&mut book), vec![], "a failing drive is not prepared");
        assert_eq!(state(&book, "sdc"), "blank");

        // Spare below the drive's own threshold is failing too, with the controller's rule.
        book.appeared(t0, facts("sdd"));
        drain(&mut book);
        book.examined("sdd", Examined::Blank);
        let mut low_spare = nvme_report(0);
        if let SmartOutcome::Report(SmartReport {
            predictors: SmartPredictors::Nvme(n),
            ..
        }) = &mut low_spare
        {
            n.available_spare = Some(3);
            n.available_spare_threshold = Some(10);
        }
        book.smart_read(t0, UnixMillis(1), "sdd", low_spare);
        assert_eq!(
            drain(&mut book),
            vec![],
            "spare below threshold is not prepared"
        );
    }

    #[test]
    fn a_drive_without_smart_is_prepared_by_policy_but_one_with_data_never_is() {
        let t0 = Instant::now();
        let mut book = DriveBook::new(DriveTiming::default(), policy(DrivePolicyMode::Prepare));
        book.appeared(t0, facts("loop1"));
        book.appeared(t0, facts("loop2"));
        drain(&mut book);
        for name in ["loop1", "loop2"] {
            book.smart_read(
                t0,
                UnixMillis(1),
                name,
                SmartOutcome::NoSmart {
                    reason: "loop device has no SMART".into(),
                },
            );
        }
        book.examined("loop2", Examined::HasData(vec!["ext4".into()]));
        assert_eq!(drain(&mut book), vec![]);
        assert_eq!(state(&book, "loop2"), "has-data");
        book.examined("loop1", Examined::Blank);
        assert!(
            matches!(&drain(&mut book)[..], [Work::Prepare { device, .. }] if device == "loop1")
        );
    }

    #[test]
    fn approve_waits_for_the_operator_and_commands_are_checked() {
        let t0 = Instant::now();
        let mut book = DriveBook::new(DriveTiming::default(), policy(DrivePolicyMode::Approve));
        book.appeared(t0, facts("sdb"));
        book.appeared(t0, facts("sdc"));
        drain(&mut book);
        book.smart_read(t0, UnixMillis(1), "sdb", nvme_report(0));
        book.examined("sdb", Examined::Blank);
        book.examined("sdc", Examined::HasData(vec!["gpt".into(), "xfs".into()]));
        assert_eq!(drain(&mut book), vec![]);
        assert_eq!(state(&book, "sdb"), "awaiting-approval");

        let prepare = |id, device: &str, force: Option<&str>| DriveCommand {
            id,
            device: device.into(),
            action: DriveAction::Prepare {
                force_serial: force.map(Into::into),
                filesystem: Some(Filesystem::Xfs),
            },
        };
        book.command(t0, prepare(1, "sdc", None));
        match &drain(&mut book)[..] {
            [Work::Answer(DriveCommandResult {
                id: 1,
                result: Err(e),
            })] => assert!(e.contains("gpt, xfs") && e.contains("--force"), "{e}"),
            other => panic!("{other:?}"),
        }
        book.command(t0, prepare(2, "sdz", None));
        assert!(matches!(
            &drain(&mut book)[..],
            [Work::Answer(DriveCommandResult {
                id: 2,
                result: Err(_)
            })]
        ));

        book.command(t0, prepare(3, "sdb", None));
        assert!(matches!(
            &drain(&mut book)[..],
            [Work::Prepare {
                filesystem: Filesystem::Xfs,
                command: Some(3),
                ..
            }]
        ));
        book.command(t0, prepare(4, "sdb", None));
        assert!(
            matches!(
                &drain(&mut book)[..],
                [Work::Answer(DriveCommandResult {
                    id: 4,
                    result: Err(_)
                })]
            ),
            "twice"
        );
        book.prepared("sdb", Some(3), Ok(prepared("sdb")));
        assert!(matches!(
            &drain(&mut book)[..],
            [Work::Answer(DriveCommandResult {
                id: 3,
                result: Ok(_)
            })]
        ));
        assert_eq!(state(&book, "sdb"), "prepared");

        // --force passes the serial on; prepare() compares it with the drive itself.
        book.command(t0, prepare(5, "sdc", Some("SER-sdc")));
        assert!(
            matches!(&drain(&mut book)[..], [Work::Prepare { force_serial: Some(s), command: Some(5), .. }] if s == "SER-sdc")
        );
        book.prepared("sdc", Some(5), Err("wrong serial".into()));
        drain(&mut book);
        assert_eq!(state(&book, "sdc"), "prepare-failed");
    }

    #[test]
    fn a_prepared_drive_that_vanishes_is_missing_and_detached_until_it_returns() {
        let t0 = Instant::now();
        let mut book = DriveBook::new(DriveTiming::default(), DrivePolicy::default());
        book.appeared(t0, facts("sdb"));
        drain(&mut book);
        book.examined("sdb", Examined::Prepared(prepared("sdb")));
        book.vanished("sdb");
        assert_eq!(drain(&mut book), vec![Work::Detach(prepared("sdb"))]);
        assert_eq!(state(&book, "sdb"), "missing");
        book.scanned(t0, vec![]);
        assert_eq!(state(&book, "sdb"), "missing", "stays missing");
        // It comes back (maybe under another name): examination restores it.
        book.appeared(t0, facts("sdd"));
        drain(&mut book);
        book.examined("sdd", Examined::Prepared(prepared("sdb")));
        let r = book.report(UnixMillis(0));
        assert_eq!(r.drives.len(), 1);
        assert_eq!(r.drives[0].state.as_str(), "prepared");
    }

    #[test]
    fn a_drive_vanishing_while_prepared_gets_its_mount_detached() {
        let t0 = Instant::now();
        let mut book = DriveBook::new(DriveTiming::default(), policy(DrivePolicyMode::Prepare));
        book.appeared(t0, facts("sdb"));
        drain(&mut book);
        book.smart_read(t0, UnixMillis(1), "sdb", nvme_report(0));
        book.examined("sdb", Examined::Blank);
        drain(&mut book);
        book.vanished("sdb");
        book.prepared("sdb", None, Ok(prepared("sdb")));
        assert_eq!(drain(&mut book), vec![Work::Detach(prepared("sdb"))]);
        assert!(book.report(UnixMillis(0)).drives.is_empty());
    }

    #[test]
    fn smart_is_read_on_schedule_and_faster_during_a_self_test() {
        let t0 = Instant::now();
        let timing = DriveTiming::default();
        let mut book = DriveBook::new(timing, DrivePolicy::default());
        book.appeared(t0, facts("sdb"));
        drain(&mut book);
        assert_eq!(book.poll_timeout(), None, "a read is out");
        book.smart_read(t0, UnixMillis(1), "sdb", nvme_report(0));
        assert_eq!(book.poll_timeout(), Some(t0 + timing.smart_interval));
        book.handle_timeout(t0 + timing.smart_interval);
        assert_eq!(drain(&mut book), vec![Work::ReadSmart("sdb".into())]);
        let t1 = t0 + timing.smart_interval;
        book.smart_read(t1, UnixMillis(2), "sdb", nvme_report(0));

        book.command(
            t1,
            DriveCommand {
                id: 9,
                device: "sdb".into(),
                action: DriveAction::SelfTest(SelfTestKind::Short),
            },
        );
        assert_eq!(
            drain(&mut book),
            vec![Work::SelfTest {
                device: "sdb".into(),
                kind: SelfTestKind::Short,
                command: 9
            }]
        );
        book.self_test_started("sdb", 9, Ok("started".into()));
        assert!(matches!(
            &drain(&mut book)[..],
            [Work::Answer(DriveCommandResult {
                id: 9,
                result: Ok(_)
            })]
        ));
        assert_eq!(book.poll_timeout(), Some(t1 + timing.self_test_poll));
        book.smart_read(
            t1 + timing.self_test_poll,
            UnixMillis(3),
            "sdb",
            nvme_report(0),
        );
        assert_eq!(
            book.poll_timeout(),
            Some(t1 + timing.self_test_poll + timing.smart_interval),
            "test over: back to normal"
        );
    }

    #[test]
    fn a_swapped_medium_under_the_same_name_is_examined_afresh() {
        let t0 = Instant::now();
        let mut book = DriveBook::new(DriveTiming::default(), DrivePolicy::default());
        book.appeared(t0, facts("sdb"));
        drain(&mut book);
        book.examined("sdb", Examined::HasData(vec!["vfat".into()]));
        book.appeared(t0, facts("sdb"));
        assert_eq!(drain(&mut book), vec![], "same medium");
        let mut other = facts("sdb");
        other.serial = Some("OTHER".into());
        book.appeared(t0, other);
        assert_eq!(
            drain(&mut book),
            vec![Work::Examine("sdb".into()), Work::ReadSmart("sdb".into())]
        );
    }
}
