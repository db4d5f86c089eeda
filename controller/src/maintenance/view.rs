//! JSON shapes of the maintenance admin API (windows, budgets, rollouts): defined in
//! `shoal_api::maintenance`, shared with `shoalctl`, re-exported here under their old paths.

pub use shoal_api::maintenance::{
    BudgetView, CreateWindow, RetryNode, RolloutNodeView, RolloutView, SetBudget, StartRollout,
    WindowView,
};
