//! The body of every error answer of the admin API.

use serde::{Deserialize, Serialize};

/// An API error body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong.
    pub error: String,
}
