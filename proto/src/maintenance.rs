//! (v4) Maintenance actions: the controller walks a node through `cordon → act → uncordon`, one
//! [`MaintenanceStep`] at a time, and the agent answers each with a [`MaintenanceResult`].
//!
//! Value types only. What the agent allows (`--allow-exec`), its hooks and timeouts live in the
//! agent; the rollout that runs the action lives in the controller.
//!
//! Rules:
//! - A step is identified by `(run, step)`: an agent that gets a step of the same run again that it
//!   already completed successfully answers the recorded outcome without doing it twice (the
//!   controller repeats the current step after a restart and on every reconnect).
//! - Outputs are bounded: an agent sends at most [`MAX_STEP_OUTPUT`] bytes of text per outcome (the
//!   end of the output, which is where errors are).
//! - Enums are externally tagged (postcard cannot decode internally tagged ones).

use serde::{Deserialize, Serialize};

/// The most bytes of text in one [`StepOutcome`].
pub const MAX_STEP_OUTPUT: usize = 4096;

/// What a maintenance run does on each node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaintenanceAction {
    /// Reboot the machine (the agent's reboot path: `--reboot-command`, kexec or `reboot(2)`).
    Reboot,
    /// Start a short SMART self-test on every drive that has SMART.
    SmartTest,
    /// Run a program the agent allows (`--allow-exec PATH`); `argv[0]` is its absolute path.
    Exec {
        /// The program and its arguments.
        argv: Vec<String>,
    },
}

impl MaintenanceAction {
    /// `reboot`, `smart-test`, `exec`.
    pub fn name(&self) -> &'static str {
        match self {
            MaintenanceAction::Reboot => "reboot",
            MaintenanceAction::SmartTest => "smart-test",
            MaintenanceAction::Exec { .. } => "exec",
        }
    }
}

impl std::fmt::Display for MaintenanceAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaintenanceAction::Exec { argv } => write!(f, "exec {}", argv.join(" ")),
            other => f.write_str(other.name()),
        }
    }
}

/// One step of a node's maintenance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// Run the pre-hook (e.g. drain the node); without one, nothing to do.
    Cordon,
    /// Carry out the action.
    Act,
    /// Run the post-hook (e.g. uncordon); without one, nothing to do.
    Uncordon,
}

impl StepKind {
    /// `cordon`, `act`, `uncordon`.
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Cordon => "cordon",
            StepKind::Act => "act",
            StepKind::Uncordon => "uncordon",
        }
    }
}

/// (v4) Controller to agent: do this step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceStep {
    /// The run (the rollout id, `r7`).
    pub run: String,
    /// The run's action (hooks see it as `SHOAL_MAINTENANCE_ACTION`).
    pub action: MaintenanceAction,
    /// The step.
    pub step: StepKind,
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// Done; a summary or the end of the output.
    Done(String),
    /// Failed; why, with the end of the error output. Nothing was left half done by the agent that
    /// it could undo itself (a failed pre-hook is followed by the post-hook).
    Failed(String),
    /// `Act` of a reboot: the machine goes down now (how). The step is done when the agent answers
    /// the repeated step from a new boot.
    Rebooting(String),
}

/// (v4) Agent to controller: how a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceResult {
    /// The run.
    pub run: String,
    /// The step.
    pub step: StepKind,
    /// The outcome.
    pub outcome: StepOutcome,
}

/// The last `max` bytes of `text` (on a character boundary), with a marker when cut.
pub fn output_tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_are_bounded_and_on_char_boundaries() {
        assert_eq!(output_tail("abc", 10), "abc");
        let long = "é".repeat(3000);
        let t = output_tail(&long, MAX_STEP_OUTPUT);
        assert!(
            t.len() <= MAX_STEP_OUTPUT + 3 && t.starts_with('…'),
            "{}",
            t.len()
        );
    }

    #[test]
    fn steps_round_trip_through_postcard() {
        let step = MaintenanceStep {
            run: "r1".into(),
            action: MaintenanceAction::Exec {
                argv: vec!["/bin/x".into(), "-v".into()],
            },
            step: StepKind::Act,
        };
        let bytes = postcard::to_allocvec(&step).expect("encode");
        assert_eq!(
            postcard::from_bytes::<MaintenanceStep>(&bytes).expect("decode"),
            step
        );
        let result = MaintenanceResult {
            run: "r1".into(),
            step: StepKind::Cordon,
            outcome: StepOutcome::Rebooting("kexec".into()),
        };
        let bytes = postcard::to_allocvec(&result).expect("encode");
        assert_eq!(
            postcard::from_bytes::<MaintenanceResult>(&bytes).expect("decode"),
            result
        );
        assert_eq!(step.action.to_string(), "exec /bin/x -v");
    }
}
