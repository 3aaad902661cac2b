//! (placeholder: filled by the loopdev work; API stub for the bus layer)
#![allow(unused)]
use std::fs::File;
use std::path::PathBuf;
pub mod images;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct LoopError;
impl crate::error::Classify for LoopError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Failed
    }
}
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    pub read_only: bool,
    pub partscan: bool,
    pub offset: u64,
    pub size_limit: u64,
}
#[derive(Debug, Clone)]
pub struct LoopInfo {
    pub number: u32,
    pub device: PathBuf,
    pub backing_file: PathBuf,
    pub backing_dev: u64,
    pub backing_inode: u64,
    pub offset: u64,
    pub size_limit: u64,
    pub size: u64,
    pub read_only: bool,
    pub partscan: bool,
}
pub fn attach_file(file: &File, opts: &AttachOptions) -> Result<LoopInfo, LoopError> {
    todo!()
}
pub fn detach(number: u32) -> Result<(), LoopError> {
    todo!()
}
pub fn info(number: u32) -> Result<Option<LoopInfo>, LoopError> {
    todo!()
}
pub fn list_attached() -> Result<Vec<LoopInfo>, LoopError> {
    todo!()
}
pub fn parse_device(s: &str) -> Result<u32, LoopError> {
    todo!()
}
