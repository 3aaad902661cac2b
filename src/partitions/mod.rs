//! (placeholder: filled by the partitions work; API stub for the bus layer)
#![allow(unused)]
use std::path::{Path, PathBuf};
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct PartError;
impl crate::error::Classify for PartError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Failed
    }
}
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    pub part_type: String,
    pub name: String,
    pub uuid: String,
    pub node: PathBuf,
    pub major: u32,
    pub minor: u32,
}
pub fn rescan(device: &Path) -> Result<Vec<Partition>, PartError> {
    todo!()
}
