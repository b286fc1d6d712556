//! hilrig-campaigns: the campaign file format, the attack library and the campaign
//! runner (simulated hosts running `hilrig-vmm`), results store and reports.
//! See README.md.

pub mod attacks;
pub mod attempt;
pub mod attest;
pub mod board;
pub mod claim;
pub mod cli;
pub mod error;
pub mod expect;
pub mod format;
pub mod hostsource;
pub mod runner;
pub mod scenario;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use cli::{main_job, run, CampaignCmd};
pub use error::{RunError, RunResult};
pub use format::{load, Campaign, CampaignError, Case, Expect, HostSpec};
pub use runner::{run_campaign, RunOptions, RunSummary};
