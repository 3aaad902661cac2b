#![allow(unused)]
use super::LoopError;
use std::fs::File;
use std::path::PathBuf;
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_size: u64,
    pub max_count: usize,
    pub max_total: u64,
}
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub uid: u32,
    pub name: String,
    pub size: u64,
    pub path: PathBuf,
}
pub struct ImageStore;
impl ImageStore {
    pub fn new(root: PathBuf, limits: Limits) -> Result<Self, LoopError> {
        todo!()
    }
    pub fn create(&self, uid: u32, name: &str, size: u64) -> Result<ImageInfo, LoopError> {
        todo!()
    }
    pub fn open(&self, uid: u32, name: &str, read_only: bool) -> Result<File, LoopError> {
        todo!()
    }
    pub fn delete(&self, uid: u32, name: &str) -> Result<(), LoopError> {
        todo!()
    }
    pub fn list(&self, uid: Option<u32>) -> Result<Vec<ImageInfo>, LoopError> {
        todo!()
    }
    pub fn path(&self, uid: u32, name: &str) -> PathBuf {
        todo!()
    }
}
